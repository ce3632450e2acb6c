"""Correctness at the edges, over real sockets: strict envelope paths, the error budget and
other protocols, HELP, Authentication-Results, DSN parameters, IDN local domains, alias
cycles, no TLS session tickets."""

from __future__ import annotations

import base64
import email
import email.policy
import socket
import ssl
import time

import pytest

from tampu import hookimpl
from tampu.authres import MethodResult, add_result
from tampu.testing import server_toml, wait_for
from tests.helpers import RawClient, only_queue_item, read_queue_item
from tests.recording import Recorder

USER, PASSWORD = "user@example.test", "secret"
MSG = b"From: a@example.org\r\nSubject: edge\r\n\r\nbody\r\n"


def session(srv, listener: str = "smtp") -> RawClient:
    c = RawClient(srv.port(listener))
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    return c


# ---------------------------------------------------------------------------- paths


@pytest.mark.parametrize(("command", "code", "status"), [
    ("MAIL FROM:<a@", 501, "5.1.7"),
    ("MAIL FROM:<a@b", 501, "5.1.7"),
    ("MAIL FROM:<a>", 501, "5.1.7"),
    ("MAIL FROM:<a@exa\x00mple.org>", 501, "5.1.7"),
    ("MAIL FROM:<a@xn--zz.org>", 553, "5.1.8"),
    ("MAIL FROM:<jösé@example.org>", 553, "5.6.7"),
    (f"MAIL FROM:<{'x' * 65}@example.org>", 501, "5.1.7"),
    ("MAIL FROM:<a@example.org> FOO=1", 555, "5.5.4"),
    ("MAIL FROM:<a@example.org> RET=SOME", 501, "5.5.4"),
])
def test_bad_reverse_paths_are_refused_at_mail(tampu_server, command, code, status):
    srv = tampu_server()
    with session(srv) as c:
        got, lines = c.cmd(command.encode())
        assert (got, lines[0][:5]) == (code, status), lines
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250  # still in step


def test_bad_forward_paths_are_refused_at_rcpt(tampu_server):
    srv = tampu_server(users={USER: PASSWORD})
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        for command, code, status in (("RCPT TO:<user@example.test", 501, "5.1.3"),
                                      ("RCPT TO:<user>", 501, "5.1.3"),
                                      ("RCPT TO:<user@[192.0.2.1]>", 550, "5.1.2"),
                                      ("RCPT TO:<user@exam_ple.test>", 553, "5.1.3"),
                                      ("RCPT TO:<üser@example.test>", 553, "5.6.7"),
                                      ("RCPT TO:<user@example.test> NOTIFY=SOMETIMES",
                                       501, "5.5.4")):
            got, lines = c.cmd(command)
            assert (got, lines[0][:5]) == (code, status), (command, lines)
        assert c.cmd("RCPT TO:<Postmaster>")[0] == 250  # RFC 5321 4.5.1: no domain needed
        assert c.cmd(b"RCPT TO:<user@example.test\xff>")[0] == 501  # not UTF-8
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250


def test_postmaster_without_domain_reaches_the_postmaster(tampu_server):
    rec = Recorder(accept_rcpt=False)
    srv = tampu_server(plugins=[rec], deliver=True)
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<postmaster>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(MSG + b".\r\n")
        assert c.reply()[0] == 250
    assert rec.wait_delivered("postmaster@example.test").address == "postmaster@example.test"


def test_an_address_literal_that_is_ours_is_local(tampu_server):
    srv = tampu_server(base=server_toml(domains=("example.test", "[127.0.0.1]")),
                       users={USER: PASSWORD})
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<postmaster@[127.0.0.1]>")[0] == 250
        assert c.cmd("RCPT TO:<user@[192.0.2.9]>")[0] == 550


def test_the_punycode_spelling_of_a_local_domain_is_local(tampu_server):
    """Mail for a local user written with the xn-- spelling stays on this server."""
    srv = tampu_server(base=server_toml(domains=("bücher.test",)),
                       users={"anna@bücher.test": PASSWORD, USER: PASSWORD}, deliver=True,
                       conf={"40-local.toml": "[plugins.delivery_maildir]\nenabled = true\n"
                             "[plugins.delivery_smtp]\nenabled = true\n"})
    with srv.smtp("submission") as c:
        c.ehlo()
        c.starttls(context=srv.client_tls())
        c.login(USER, PASSWORD)
        c.sendmail(USER, ["Anna@XN--BCHER-KVA.test"], b"Subject: idn\r\n\r\nhallo\r\n")
    maildir = srv.server.config.data_dir / "mail" / "bücher.test" / "anna" / "new"
    files = wait_for(lambda: list(maildir.iterdir()) if maildir.is_dir() else [],
                     what="local delivery into the Unicode-named Maildir")
    assert b"hallo" in files[0].read_bytes()
    assert not (srv.server.config.data_dir / "mail" / "xn--bcher-kva.test").exists()


def test_a_users_folder_in_punycode_is_the_same_domain(tampu_server):
    srv = tampu_server(base=server_toml(domains=()), users={"anna@xn--bcher-kva.test": PASSWORD})
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 250
        assert c.cmd("RCPT TO:<anna@bücher.test>")[0] == 250
        assert c.cmd("RCPT TO:<anna@xn--bcher-kva.test>")[0] == 250


# ---------------------------------------------------------------------------- the session


def test_http_on_the_smtp_port_is_closed_at_once(tampu_server):
    srv = tampu_server()
    with RawClient(srv.port("smtp")) as c:
        assert c.reply()[0] == 220
        c.send("GET / HTTP/1.1")
        c.send("Host: example.test")
        assert c.closed_by_server()


def test_a_tls_client_hello_on_a_plain_port_is_closed_at_once(tampu_server):
    srv = tampu_server()
    raw = socket.create_connection(("127.0.0.1", srv.port("smtp")), timeout=5)
    try:
        assert raw.recv(1024).startswith(b"220 ")
        ctx = ssl.create_default_context()
        tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        raw.sendall(outgoing.read())  # a real ClientHello
        start = time.monotonic()
        assert raw.recv(1024) == b""  # closed, without waiting for the command deadline
        assert time.monotonic() - start < 5
    finally:
        raw.close()


def test_help_lists_what_is_available(tampu_server):
    srv = tampu_server(users={USER: PASSWORD})
    with session(srv, "submission") as c:
        code, lines = c.cmd("HELP")
        assert code == 214 and lines[0].startswith("2.0.0 ")
        assert "STARTTLS" in lines[0] and "AUTH" not in lines[0]
        c.starttls(srv.client_tls())
        c.cmd("EHLO client.test")
        code, lines = c.cmd("HELP")
        assert "AUTH" in lines[0] and "STARTTLS" not in lines[0]


def test_refused_recipients_count_as_errors_only_past_the_free_ones(tampu_server):
    srv = tampu_server(conf={"50-e.toml": "[server]\nmax_errors = 3\n"
                                          "free_refused_recipients = 5\n"}, users={USER: PASSWORD})
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        for i in range(5):  # a sender cleaning its list: not an attacker
            assert c.cmd(f"RCPT TO:<nobody{i}@example.test>")[0] == 550
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        for i in range(3):
            assert c.cmd(f"RCPT TO:<more{i}@example.test>")[0] == 550
        code, lines = c.reply()
        assert (code, lines[0][:5]) == (421, "4.7.0")
        assert c.closed_by_server()


def test_no_tls_session_tickets(tampu_server):
    srv = tampu_server()
    ctx = srv.client_tls()
    with socket.create_connection(("127.0.0.1", srv.port("submissions")), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.recv(1024).startswith(b"220 ")
            tls.sendall(b"QUIT\r\n")
            tls.recv(1024)
            assert tls.session is not None and not tls.session.has_ticket


# ---------------------------------------------------------------------------- headers


class Checker:
    """Records a result, as a checking plugin (spf, dkim) does."""

    name = "checker"

    @hookimpl
    def smtp_data(self, session, envelope, message):
        add_result(envelope, MethodResult("spf", "pass", (("smtp.mailfrom", "a@example.org"),),
                                          comment="a (test) comment"))


def test_authentication_results_are_ours_alone(tampu_server):
    srv = tampu_server(plugins=[Checker()], users={USER: PASSWORD})
    forged = (b"Authentication-Results: localhost; dkim=pass header.d=bank.test\r\n"
              b"Authentication-Results: (c) LOCALHOST;\r\n\tdmarc=pass\r\n"
              b"Authentication-Results: mx.other.test; spf=fail\r\n")
    with srv.smtp() as c:
        c.sendmail("a@example.org", [USER], forged + MSG)
    _, _, message = only_queue_item(srv)
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    values = [" ".join(str(v).split()) for v in parsed.get_all("Authentication-Results")]
    assert values == ["localhost; spf=pass (a test comment) smtp.mailfrom=a@example.org",
                      "mx.other.test; spf=fail"]  # another server's claim is kept
    assert b"bank.test" not in message and b"()" not in message


# ---------------------------------------------------------------------------- DSN parameters


def test_dsn_is_advertised_and_its_parameters_are_kept(tampu_server):
    srv = tampu_server(users={USER: PASSWORD})
    with session(srv) as c:
        code, lines = c.cmd("EHLO client.test")
        assert "DSN" in lines
        assert c.cmd("MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ314159")[0] == 250
        assert c.cmd("RCPT TO:<user@example.test> NOTIFY=SUCCESS,FAILURE "
                     "ORCPT=rfc822;Alias@example.test")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(MSG + b".\r\n")
        assert c.reply()[0] == 250
    _, header, _ = only_queue_item(srv)
    assert header["dsn_ret"] == "HDRS" and header["dsn_envid"] == "QQ314159"
    assert header["recipients"][0]["notify"] == ["FAILURE", "SUCCESS"]
    assert header["recipients"][0]["orcpt"] == "rfc822;Alias@example.test"


def dsn_server(tampu_server, outcomes):
    rec = Recorder(outcomes)
    srv = tampu_server(plugins=[rec], deliver=True, users={USER: PASSWORD},
                       conf={"50-dsn.toml": "[plugins.dsn]\nenabled = true\n"})
    return srv, rec


def send_with(srv, mail_params: str, rcpts: list[tuple[str, str]]) -> str:
    with session(srv) as c:
        assert c.cmd(f"MAIL FROM:<sender@example.test> {mail_params}".strip())[0] == 250
        for address, params in rcpts:
            assert c.cmd(f"RCPT TO:<{address}> {params}".strip())[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(MSG + b".\r\n")
        code, lines = c.reply()
        assert code == 250
        return lines[0].rpartition(" ")[2]


def test_notify_success_gets_a_delivered_report_with_envid_and_orcpt(tampu_server):
    from tampu import DeliveryResult

    srv, rec = dsn_server(tampu_server, {"gone@example.test": [DeliveryResult.permanent(
        "no such user", code=550, enhanced="5.1.1")]})
    send_with(srv, "RET=FULL ENVID=env-1", [("ok@example.test",
                                              "NOTIFY=SUCCESS ORCPT=rfc822;Orig@example.test"),
                                             ("gone@example.test", "NOTIFY=NEVER")])
    report = rec.wait_delivered("sender@example.test", origin="dsn")
    text = report.message.decode()
    assert "Action: delivered" in text and "Status: 2.0.0" in text
    assert "Original-Envelope-Id: env-1" in text
    assert "Original-Recipient: rfc822;Orig@example.test" in text
    assert "message/rfc822" in text  # RET=FULL: the whole message comes back
    time.sleep(1.0)  # NOTIFY=NEVER: the failure of gone@ gets no report
    assert len([d for d in rec.delivered if d.origin == "dsn"]) == 1


def test_default_notify_reports_failures_with_headers_only(tampu_server):
    from tampu import DeliveryResult

    srv, rec = dsn_server(tampu_server, {"gone@example.test": [DeliveryResult.permanent(
        "no such user", code=550, enhanced="5.1.1")]})
    send_with(srv, "", [("gone@example.test", "")])
    text = rec.wait_delivered("sender@example.test", origin="dsn").message.decode()
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "text/rfc822-headers" in text and "message/rfc822" not in text


def test_notify_delay_gets_one_delay_report(tampu_server):
    from tampu import DeliveryResult

    rec = Recorder({"slow@example.test": [DeliveryResult.temporary("busy", code=451),
                                          DeliveryResult.temporary("busy", code=451),
                                          DeliveryResult.sent()]}, retry_delay=0.2)
    srv = tampu_server(plugins=[rec], deliver=True, users={USER: PASSWORD},
                       conf={"50-dsn.toml": "[plugins.dsn]\nenabled = true\n",
                             "51-delay.toml": "[server]\ndelay_warning_after = 0.1\n"})
    qid = send_with(srv, "", [("slow@example.test", "NOTIFY=DELAY,FAILURE")])
    rec.wait_done(qid)
    reports = [d for d in rec.delivered if d.origin == "dsn"]
    assert len(reports) == 1  # once, though two rounds were late
    assert "Action: delayed" in reports[0].message.decode()


# ---------------------------------------------------------------------------- aliases


def test_an_alias_cycle_without_a_user_is_a_temporary_failure(tampu_server):
    srv = tampu_server(conf={"31-aliases.toml": "[plugins.aliases]\nenabled = true\n"},
                       users={USER: PASSWORD})
    (srv.config_dir / "domains" / "example.test" / "aliases").write_text("a: b\nb: a\n")
    with session(srv) as c:
        assert c.cmd("MAIL FROM:<s@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<a@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(MSG + b".\r\n")
        code, lines = c.reply()
        assert (code, lines[0][:5]) == (451, "4.3.0")  # chasquid's answer; never a mailbox
    assert srv.queue_items() == []


def test_auth_plain_user_with_uppercase_domain_is_canonical(tampu_server):
    srv = tampu_server(users={USER: PASSWORD})
    with RawClient(srv.port("submissions"), tls=srv.client_tls()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        blob = base64.b64encode(b"\0User@EXAMPLE.Test\0" + PASSWORD.encode()).decode()
        assert c.cmd(f"AUTH PLAIN {blob}")[0] == 235
        assert c.cmd("MAIL FROM:<user@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<x@remote.example>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(MSG + b".\r\n")
        assert c.reply()[0] == 250
    _, header, _ = only_queue_item(srv)
    assert header["auth_user"] == "user@example.test"


def test_queue_item_header_roundtrip(tampu_server):
    srv = tampu_server(users={USER: PASSWORD})
    with srv.smtp() as c:
        c.sendmail("a@example.org", [USER], MSG)
    name, _, _ = only_queue_item(srv)
    header, _ = read_queue_item(srv, name)
    assert header["v"] == 2
