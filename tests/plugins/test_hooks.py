"""hooks: the post-data hook program, real shell scripts, real SMTP sessions."""

from __future__ import annotations

import email
import email.policy
import os
import time

import pytest

from tampu.plugins.hooks import parse_headers, refusal, sanitize_ehlo
from tampu.testing import server_toml

USER, PASSWORD = "user@example.test", "secret"
OTHER = "other@example.test"

ENV_DUMP = """#!/bin/sh
env > "$PWD/env.out"
pwd > "$PWD/cwd.out"
cat > "$PWD/stdin.out"
echo "X-Hook: ran"
echo "X-Folded: first"
printf '\\tsecond\\n'
"""


@pytest.fixture
def hook_server(tampu_server, make_dns):
    dns = make_dns({"pass.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']}})

    def start(script: str | None, conf: str = ""):
        base = server_toml(extra=f'dns_servers = ["127.0.0.1:{dns.port}"]\ndns_timeout = 1')
        conf_d = {"30-spf.toml": "[plugins.spf]\nenabled = true\n",
                  "32-hooks.toml": f"[plugins.hooks]\nenabled = true\n{conf}\n"}
        srv = tampu_server(base=base, conf=conf_d, users={USER: PASSWORD, OTHER: "x"})
        if script is not None:
            path = srv.config_dir / "hooks" / "post-data"
            path.parent.mkdir(exist_ok=True)
            path.write_text(script)
            path.chmod(0o755)
        return srv
    return start


def env_of(srv) -> dict[str, str]:
    lines = (srv.config_dir / "env.out").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def queued(srv, reply) -> email.message.Message:
    qid = reply[1].decode().rsplit(" ", 1)[-1]
    return email.message_from_bytes(srv.store.read_message_now(qid),
                                    policy=email.policy.compat32)


def test_environment_stdin_and_headers_on_plain_smtp(hook_server):
    srv = hook_server(ENV_DUMP)
    with srv.smtp() as c:
        c.ehlo("we;ird$(name)[1.2.3.4]")
        assert c.mail("bob@pass.test")[0] == 250
        assert c.rcpt(USER)[0] == 250 and c.rcpt(OTHER)[0] == 250
        reply = c.data(b"Subject: hooked\r\n\r\nthe body\r\n")
        local_port = c.sock.getsockname()[1]
    assert reply[0] == 250, reply
    env = env_of(srv)
    assert env["REMOTE_ADDR"] == f"127.0.0.1:{local_port}"
    assert env["EHLO_DOMAIN"] == "weirdname[1.2.3.4]"
    assert env["EHLO_DOMAIN_RAW"] == "we;ird$(name)[1.2.3.4]"
    assert env["MAIL_FROM"] == "bob@pass.test"
    assert env["RCPT_TO"] == f"{USER} {OTHER}"
    assert env["AUTH_AS"] == ""
    assert env["ON_TLS"] == "0"
    assert env["FROM_LOCAL_DOMAIN"] == "0"
    assert env["SPF_PASS"] == "1"
    assert env["PWD"] == str(srv.config_dir)
    for name in ("USER", "SHELL", "PATH"):
        assert env[name] == os.environ.get(name, "")
    assert set(env) <= {"USER", "SHELL", "PATH", "PWD", "REMOTE_ADDR", "EHLO_DOMAIN",
                        "EHLO_DOMAIN_RAW", "MAIL_FROM", "RCPT_TO", "AUTH_AS", "ON_TLS",
                        "FROM_LOCAL_DOMAIN", "SPF_PASS", "SHLVL", "_"}  # sh adds the last two
    assert (srv.config_dir / "cwd.out").read_text().strip() == str(srv.config_dir)
    stdin = (srv.config_dir / "stdin.out").read_bytes()
    assert b"the body" in stdin and b"Received-SPF: Pass" in stdin  # SPF ran first
    msg = queued(srv, reply)
    assert msg["X-Hook"] == "ran"
    assert msg["X-Folded"].replace("\r\n", "\n") == "first\n\tsecond"
    assert msg["Subject"] == "hooked"


def test_environment_of_an_authenticated_tls_session(hook_server):
    srv = hook_server(ENV_DUMP)
    with srv.smtp("submission") as c:
        c.ehlo()
        c.starttls(context=srv.client_tls())
        c.ehlo()
        c.login(USER, PASSWORD)
        reply = c.sendmail(USER, ["someone@remote.test"], b"Subject: x\r\n\r\nb\r\n")
    assert reply == {}
    env = env_of(srv)
    assert env["AUTH_AS"] == USER
    assert env["ON_TLS"] == "1"
    assert env["FROM_LOCAL_DOMAIN"] == "1"
    assert env["SPF_PASS"] == "0"  # not checked for authenticated users
    assert env["RCPT_TO"] == "someone@remote.test"


def test_null_sender_is_shown_as_brackets(hook_server):
    srv = hook_server(ENV_DUMP)
    with srv.smtp() as c:
        c.ehlo("client.test")
        c.sendmail("<>", [USER], b"Subject: x\r\n\r\nb\r\n")
    env = env_of(srv)
    assert env["MAIL_FROM"] == "<>" and env["SPF_PASS"] == "0"


@pytest.mark.parametrize("script,code,text", [
    ('echo "X-A: 1"\necho "5.7.1 spam detected"\nexit 20', 554, "5.7.1 spam detected"),
    ('echo "virus found"\nexit 20', 554, "5.7.1 virus found"),
    ('echo "5.7.0 policy"\nexit 20', 554, "5.7.0 policy"),
    ('echo "greylisted, please try again"\nexit 75', 451, "4.3.0 greylisted, please try again"),
    ("exit 1", 451, "4.3.0 Temporary error in the post-data hook, try again later"),
])
def test_exit_codes(hook_server, script, code, text):
    srv = hook_server(f"#!/bin/sh\ncat >/dev/null\n{script}\n")
    with srv.smtp() as c:
        c.ehlo()
        c.mail("a@elsewhere.test")
        c.rcpt(USER)
        reply = c.data(b"Subject: x\r\n\r\nb\r\n")
    assert (reply[0], reply[1].decode()) == (code, text)
    assert srv.queue_items() == []


def test_malformed_output_is_not_injected(hook_server):
    srv = hook_server('#!/bin/sh\ncat >/dev/null\necho "X-Ok: 1"\necho "not a header"\n')
    with srv.smtp() as c:
        c.ehlo()
        c.mail("a@elsewhere.test")
        c.rcpt(USER)
        reply = c.data(b"Subject: x\r\n\r\nb\r\n")
    assert reply[0] == 250
    msg = queued(srv, reply)
    assert msg["X-Ok"] is None and b"not a header" not in srv.store.read_message_now(
        reply[1].decode().rsplit(" ", 1)[-1])


def test_timeout_is_a_temporary_failure(hook_server):
    srv = hook_server("#!/bin/sh\ncat >/dev/null\nsleep 30\n", conf="timeout = 1")
    start = time.monotonic()
    with srv.smtp() as c:
        c.ehlo()
        c.mail("a@elsewhere.test")
        c.rcpt(USER)
        reply = c.data(b"Subject: x\r\n\r\nb\r\n")
    assert time.monotonic() - start < 4
    assert reply[0] == 451 and reply[1].startswith(b"4.3.0")


def test_absent_hook_is_skipped(hook_server):
    srv = hook_server(None)
    with srv.smtp() as c:
        c.ehlo()
        assert c.sendmail("a@elsewhere.test", [USER], b"Subject: x\r\n\r\nb\r\n") == {}
    assert len(srv.queue_items()) == 1


def test_header_validation_and_refusal_text():
    assert parse_headers("") == []
    assert parse_headers("X-A: 1\nX-B:2\n\tcont\n") == [("X-A", "1"), ("X-B", "2\r\n\tcont")]
    assert parse_headers("X-A: 1") is None  # no final newline
    assert parse_headers(" cont\n") is None
    assert parse_headers("X-A: 1\n\nbody\n") is None
    assert parse_headers("Bad Name: 1\n") is None
    assert sanitize_ehlo("a b;c`d[::1]") == "abcd[::1]"
    assert refusal("x\n4.7.1 later\n", permanent=False).status == "4.7.1"
    assert refusal("5.7.1 wrong class\n", permanent=False).text == "5.7.1 wrong class"
