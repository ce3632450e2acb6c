"""sender_policy: what an authenticated user may use as MAIL FROM and From:, over SMTP."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tampu.errors import ConfigError
from tampu.plugins.sender_policy.check import from_addresses
from tampu.testing import make_config_dir, runtime_for, server_toml

D = "example.test"
USERS = {f"ana@{D}": "ana secret", f"luis@{D}": "luis secret", f"web@{D}": "web secret",
         "bea@other.test": "bea secret"}
ALIASES = ("sales: ana, luis\nana.alias: ana\nteam: luis\nout: someone@remote.test\n"
           "loop1: loop2\nloop2: loop1\n")


def policy(extra: str = "", aliases: bool = True) -> dict[str, str]:
    conf = {"22-sender-policy.toml": f"[plugins.sender_policy]\nenabled = true\n{extra}"}
    if aliases:
        conf["31-aliases.toml"] = "[plugins.aliases]\nenabled = true\n"
    return conf


def start(tampu_server, extra: str = "", *, aliases: bool = True):
    srv = tampu_server(conf=policy(extra, aliases), users=USERS,
                       base=server_toml(domains=(D, "other.test")))
    (srv.config_dir / "domains" / D / "aliases").write_text(ALIASES)
    return srv


def session(srv, user: str):
    client = srv.smtp("submissions")
    client.ehlo("client.test")
    client.login(user, USERS[user])
    return client


def mail_from(srv, user: str | None, sender: str) -> tuple[int, str]:
    client = session(srv, user) if user else srv.smtp()
    try:
        if user is None:
            client.ehlo("client.test")
        code, text = client.mail(sender)
        return code, text.decode()
    finally:
        client.quit()


def send(srv, user: str, sender: str, header_from: str) -> tuple[int, str]:
    client = session(srv, user)
    try:
        code, text = client.mail(sender)
        assert code == 250, text
        assert client.rcpt(f"luis@{D}")[0] == 250
        body = (f"From: {header_from}\r\nTo: luis@{D}\r\nSubject: hi\r\n\r\nhello\r\n")
        code, text = client.data(body.encode())
        return code, text.decode()
    finally:
        client.quit()


def test_envelope_mode(tampu_server):
    srv = start(tampu_server)
    for sender in (f"ana@{D}", f"ANA@{D}", f"ana+news@{D}", f"a.na@{D}",  # own address
                   f"sales@{D}", f"ana.alias@{D}", f"ana.alias+x@{D}"):  # aliases with ana
        code, text = mail_from(srv, f"ana@{D}", sender)
        assert code == 250, (sender, text)
    for sender in (f"luis@{D}", f"team@{D}", f"out@{D}", "ana@other.test",
                   "someone@remote.test", f"nobody@{D}"):
        code, text = mail_from(srv, f"ana@{D}", sender)
        assert code == 550, (sender, text)
        assert text.startswith("5.7.1 ") and f"<{sender}> is not allowed for ana@{D}" in text
    assert mail_from(srv, f"luis@{D}", f"team@{D}")[0] == 250
    assert mail_from(srv, f"luis@{D}", f"sales@{D}")[0] == 250
    # the null sender names nobody: allowed by default
    assert mail_from(srv, f"ana@{D}", "")[0] == 250
    # unauthenticated sessions are never judged here
    assert mail_from(srv, None, f"luis@{D}")[0] == 250


def test_catch_all_and_alias_trouble(tampu_server):
    srv = start(tampu_server)
    (srv.config_dir / "domains" / "other.test" / "aliases").write_text("*: bea\n")
    # whoever receives an address's mail may send as it: the catch-all's owner too
    assert mail_from(srv, "bea@other.test", "anything@other.test")[0] == 250
    assert mail_from(srv, f"ana@{D}", "anything@other.test")[0] == 550
    # an alias that cannot be resolved now (a loop without a user): try again later
    code, text = mail_from(srv, f"ana@{D}", f"loop1@{D}")
    assert code == 451 and text.startswith("4.3.0")
    assert mail_from(srv, f"ana@{D}", f"ana@{D}")[0] == 250


def test_refused_sender_leaves_the_session_usable(tampu_server):
    srv = start(tampu_server)
    client = session(srv, f"ana@{D}")
    try:
        assert client.mail(f"luis@{D}")[0] == 550
        assert client.mail(f"ana@{D}")[0] == 250
        assert client.rcpt(f"luis@{D}")[0] == 250
        assert client.data(f"From: ana@{D}\r\nSubject: x\r\n\r\nok\r\n".encode())[0] == 250
    finally:
        client.quit()
    assert len(srv.queue_items()) == 1


def test_without_the_aliases_plugin_only_own_addresses(tampu_server):
    srv = start(tampu_server, aliases=False)
    assert mail_from(srv, f"ana@{D}", f"ana+x@{D}")[0] == 250
    assert mail_from(srv, f"ana@{D}", f"sales@{D}")[0] == 550


def test_header_mode(tampu_server):
    srv = start(tampu_server, 'mode = "envelope+header"\n')
    assert send(srv, f"ana@{D}", f"ana@{D}", f"Ana <ana@{D}>")[0] == 250
    assert send(srv, f"ana@{D}", f"ana@{D}", f'"Sales" <sales@{D}>')[0] == 250
    code, text = send(srv, f"ana@{D}", f"ana@{D}", f"Luis <luis@{D}>")
    assert code == 550 and f"5.7.1 From: <luis@{D}> is not allowed for ana@{D}" in text
    # every address of From: must be allowed
    code, text = send(srv, f"ana@{D}", f"ana@{D}", f"ana@{D}, luis@{D}")
    assert code == 550 and f"<luis@{D}>" in text
    code, text = send(srv, f"ana@{D}", f"ana@{D}", "ana")
    assert code == 550 and "Cannot tell who the From: header names" in text
    # the null sender passes MAIL FROM; its From: is still checked
    assert send(srv, f"ana@{D}", "", f"ana@{D}")[0] == 250
    assert send(srv, f"ana@{D}", "", f"luis@{D}")[0] == 550
    assert len(srv.queue_items()) == 3


def test_envelope_mode_does_not_read_headers(tampu_server):
    srv = start(tampu_server)
    assert send(srv, f"ana@{D}", f"ana@{D}", f"luis@{D}")[0] == 250


def test_per_domain_override(tampu_server):
    srv = start(tampu_server, 'mode = "off"\n[plugins.sender_policy.domains."OTHER.test"]\n'
                'mode = "envelope+header"\n')
    # example.test users: off
    assert mail_from(srv, f"ana@{D}", f"luis@{D}")[0] == 250
    assert send(srv, f"ana@{D}", "anyone@remote.test", f"luis@{D}")[0] == 250
    # other.test users: envelope and header
    assert mail_from(srv, "bea@other.test", "bea+x@other.test")[0] == 250
    assert mail_from(srv, "bea@other.test", f"ana@{D}")[0] == 550
    code, text = send(srv, "bea@other.test", "bea@other.test", f"ana@{D}")
    assert code == 550 and "From: <ana@example.test>" in text


def test_allowed_users_may_send_as_anyone(tampu_server):
    srv = start(tampu_server, f'mode = "envelope+header"\nallowed_users = ["Web@{D}"]\n'
                'null_sender = false\n')
    assert mail_from(srv, f"web@{D}", "someone@remote.test")[0] == 250
    assert send(srv, f"web@{D}", f"luis@{D}", "Someone <someone@remote.test>")[0] == 250
    assert mail_from(srv, f"ana@{D}", f"luis@{D}")[0] == 550
    code, text = mail_from(srv, f"ana@{D}", "")
    assert code == 550 and "null sender" in text
    assert mail_from(srv, f"web@{D}", "")[0] == 250


def test_settings_are_validated(tmp_path):
    from tampu.config import load_config

    for bad, word in (('allowed_users = ["web"]', "allowed_users"),
                      ('mode = "strict"', "mode"),
                      ('[plugins.sender_policy.domains."bad domain!"]\nmode = "off"', "domains")):
        root = make_config_dir(tmp_path / word, conf=policy(bad))
        with pytest.raises(ConfigError) as err:
            runtime_for(load_config(root))
        assert any(word in p for p in err.value.problems), err.value.problems


def test_from_addresses():
    assert from_addresses(["Ana <ana@example.test>"]) == (["ana@example.test"], "")
    assert from_addresses(["a@x.test, b@y.test", "a@x.test"]) == (["a@x.test", "b@y.test"], "")
    assert from_addresses([]) == ([], "")
    assert from_addresses(["ana"])[1]
    assert from_addresses(["<ana@x.test"])[1]  # repaired by the parser: not trusted
    assert from_addresses(["undisclosed:;"])[1]
    assert from_addresses(["x" * 5000 + "@x.test"])[1] == "the From: header is too long"


@given(st.text(max_size=200))
def test_from_addresses_never_crashes(value):
    found, problem = from_addresses([value])
    assert bool(problem) != bool(found)
    assert all("@" in a for a in found)
