"""TLS (STARTTLS, implicit TLS, SNI) and AUTH (PLAIN, LOGIN) at reception.

Users are made by the real CLI (``tampu user add ... --password-stdin``), certificates by
trustme; clients are smtplib, aiosmtplib, swaks and a raw socket.
"""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
import subprocess
import textwrap
import time
from pathlib import Path

import aiosmtplib
import pytest

from tampu.testing import make_config_dir
from tests.conftest import require_tool
from tests.helpers import RawClient, add_user, issue_cert, read_queue_item

USER = "user@example.test"
PASSWORD = "correct horse battery 9"
UTF8_PASSWORD = "pässwörd ünïcode"  # smtplib sends ASCII only: raw client
MSG = b"Subject: t\r\n\r\nhello\r\n"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory, tampu_ca) -> Path:
    """One configuration directory for the module, its users made by ``tampu user add``."""
    root = make_config_dir(tmp_path_factory.mktemp("tlsauth") / "conf", ca=tampu_ca, conf={
        "50-auth.toml": "[plugins.auth]\nscrypt_log_n = 10\n"})
    add_user(root, USER, PASSWORD)
    add_user(root, "other@example.test", UTF8_PASSWORD)
    users = (root / "domains" / "example.test" / "users").read_text()
    assert PASSWORD not in users and "$scrypt$ln=10," in users
    return root


@pytest.fixture
def srv(tampu_server, conf_dir):
    return tampu_server(config_dir=conf_dir)


def tls_client(srv, listener: str) -> RawClient:
    """A raw client past the greeting, EHLO and (on plain listeners) STARTTLS + EHLO."""
    if listener == "submissions":
        c = RawClient(srv.port(listener), tls=srv.client_tls())
        c.reply()
    else:
        c = RawClient(srv.port(listener))
        c.reply()
        c.cmd("EHLO client.test")
        c.starttls(srv.client_tls())
    code, lines = c.cmd("EHLO client.test")
    assert code == 250 and "AUTH PLAIN LOGIN" in lines, lines
    return c


@pytest.mark.parametrize("listener", ["smtp", "submission"])
def test_auth_refused_before_tls(srv, listener):
    with RawClient(srv.port(listener)) as c:
        c.reply()
        code, lines = c.cmd("EHLO client.test")
        assert not [k for k in lines if k.startswith("AUTH")], lines
        code, lines = c.cmd("AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}"))
        assert (code, lines[0][:7]) == (538, "5.7.11 "), lines
        code, lines = c.cmd("AUTH LOGIN")
        assert code == 538, lines
        # the refusal did not authenticate anything
        code, lines = c.cmd("MAIL FROM:<user@example.test>")
        if listener == "submission":
            assert code == 530, lines
        else:
            assert code == 250
            assert c.cmd("RCPT TO:<x@remote.example>")[0] == 550


def _auth(c: RawClient, mechanism: str, initial: bool, user: str, password: str
          ) -> tuple[int, list[str]]:
    if mechanism == "PLAIN":
        blob = b64(f"\0{user}\0{password}")
        if initial:
            return c.cmd(f"AUTH PLAIN {blob}")
        code, lines = c.cmd("AUTH PLAIN")
        assert (code, lines) == (334, [""]), lines
        return c.cmd(blob)
    if initial:
        code, lines = c.cmd(f"AUTH LOGIN {b64(user)}")
    else:
        code, lines = c.cmd("AUTH LOGIN")
        assert (code, lines) == (334, [b64("Username:")]), lines
        code, lines = c.cmd(b64(user))
    assert (code, lines) == (334, [b64("Password:")]), lines
    return c.cmd(b64(password))


@pytest.mark.parametrize("listener", ["submission", "smtp", "submissions"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "challenge"])
def test_auth_works_over_tls(srv, listener, mechanism, initial):
    with tls_client(srv, listener) as c:
        code, lines = _auth(c, mechanism, initial, USER, PASSWORD)
        assert (code, lines[0][:6]) == (235, "2.7.0 "), lines
        code, lines = c.cmd("EHLO client.test")
        assert not [k for k in lines if k.startswith("AUTH")], "AUTH offered when authenticated"
        assert c.cmd("MAIL FROM:<user@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<friend@remote.example>")[0] == 250  # relay once authenticated


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_wrong_password_and_unknown_user_refused(srv, listener, caplog):
    with tls_client(srv, listener) as c:
        for mechanism, user, password in [("PLAIN", USER, "wrong"), ("LOGIN", USER, "wrong"),
                                          ("PLAIN", "ghost@example.test", PASSWORD),
                                          ("PLAIN", "user", PASSWORD),
                                          ("LOGIN", "other@example.test", PASSWORD)]:
            code, lines = _auth(c, mechanism, True, user, password)
            assert (code, lines[0][:6]) == (535, "5.7.8 "), (mechanism, user, lines)
        assert c.cmd("MAIL FROM:<user@example.test>")[0] == 530  # still not authenticated
        code, lines = _auth(c, "PLAIN", True, USER.upper(), PASSWORD)  # logins ignore case
        assert code == 235, lines
    with tls_client(srv, listener) as c:
        assert _auth(c, "LOGIN", False, "other@example.test", UTF8_PASSWORD)[0] == 235
    assert PASSWORD not in caplog.text and "wrong" not in caplog.text.replace("wrong password", "")


def test_auth_protocol_errors(srv):
    with tls_client(srv, "submission") as c:
        code, lines = c.cmd("AUTH CRAM-MD5")
        assert (code, lines[0][:6]) == (504, "5.5.4 "), lines
        code, lines = c.cmd("AUTH PLAIN !!notbase64!!")
        assert (code, lines[0][:6]) == (501, "5.5.2 "), lines
        code, lines = c.cmd("AUTH PLAIN " + b64("no-nul-here"))
        assert code == 501, lines
        code, lines = c.cmd("AUTH PLAIN " + b64(f"someone-else\0{USER}\0{PASSWORD}"))
        assert code == 535, lines  # authorization identity must be the login
        code, lines = c.cmd("AUTH LOGIN")
        assert code == 334
        code, lines = c.cmd("*")  # client cancels
        assert code == 501, lines
        assert _auth(c, "LOGIN", False, USER, PASSWORD)[0] == 235
        code, lines = c.cmd("AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}"))
        assert (code, lines[0][:6]) == (503, "5.5.1 "), lines
    with tls_client(srv, "smtp") as c:  # AUTH inside a transaction
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        code, lines = _auth(c, "PLAIN", True, USER, PASSWORD)
        assert code == 503, lines


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_submission_requires_auth_before_mail(srv, listener):
    with tls_client(srv, listener) as c:
        for command in ("MAIL FROM:<user@example.test>", "RCPT TO:<user@example.test>", "DATA"):
            code, lines = c.cmd(command)
            assert (code, lines[0][:6]) == (530, "5.7.0 "), (command, lines)
        assert c.cmd("NOOP")[0] == 250
        assert _auth(c, "PLAIN", True, USER, PASSWORD)[0] == 235
        assert c.cmd("MAIL FROM:<user@example.test>")[0] == 250


def test_smtplib_starttls_and_implicit_tls(srv):
    with srv.smtp("submission") as c:
        c.ehlo()
        c.starttls(context=srv.client_tls())
        c.ehlo()
        assert c.login(USER, PASSWORD)[0] == 235
        assert c.sendmail(USER, ["friend@remote.example", "other@example.test"], MSG) == {}
    with srv.smtp("submissions") as c:
        c.ehlo()
        c.user, c.password = USER, PASSWORD
        assert c.auth("LOGIN", c.auth_login, initial_response_ok=False)[0] == 235
    with srv.smtp("submissions") as c, pytest.raises(smtplib.SMTPAuthenticationError) as info:
        c.login(USER, "nope")
    assert info.value.smtp_code == 535


def test_aiosmtplib_implicit_tls_auth_and_queue(tampu_server, tmp_path, tampu_ca):
    root = make_config_dir(tmp_path / "conf", ca=tampu_ca)
    add_user(root, USER, PASSWORD)
    srv = tampu_server(config_dir=root)

    async def send() -> str:
        client = aiosmtplib.SMTP(hostname="localhost", port=srv.port("submissions"),
                                 use_tls=True, tls_context=srv.client_tls(), timeout=10)
        async with client:
            await client.login(USER, PASSWORD)
            refused, reply = await client.sendmail(USER, ["friend@remote.example"], MSG)
            assert refused == {}
        # the TLS shutdown (close_notify) needs a few more turns of this loop before its
        # socket is closed; without them asyncio.run may close the loop first and leave
        # the socket to the garbage collector (a ResourceWarning in a later test)
        await asyncio.sleep(0.1)
        return reply

    reply = asyncio.run(send())
    qid = reply.rpartition(" ")[2]
    header, message = read_queue_item(srv, qid)
    assert header["auth_user"] == USER
    assert [r["address"] for r in header["recipients"]] == ["friend@remote.example"]
    assert message.endswith(MSG)


def test_swaks_starttls_auth(srv, tmp_path, tampu_ca):
    swaks = require_tool("swaks")
    ca_file = tmp_path / "ca.pem"
    tampu_ca.cert_pem.write_to_path(str(ca_file))
    for mechanism in ("PLAIN", "LOGIN"):
        done = subprocess.run(
            [swaks, "--server", "localhost", "--port", str(srv.port("submission")), "-tls",
             "--tls-verify", "--tls-ca-path", str(ca_file), "--auth", mechanism,
             "--auth-user", USER, "--auth-password", PASSWORD, "--from", USER,
             "--to", "friend@remote.example", "--helo", "client.test", "--timeout", "10"],
            capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "235 2.7.0" in done.stdout and "Queued as" in done.stdout


def test_swaks_implicit_tls_wrong_password(srv):
    swaks = require_tool("swaks")
    done = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(srv.port("submissions")), "-tlsc",
         "--auth", "PLAIN", "--auth-user", USER, "--auth-password", "wrong", "--from", USER,
         "--to", "friend@remote.example", "--timeout", "10"],
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "535 5.7.8" in done.stdout, done.stdout


# ------------------------------------------------------------------------------ SNI


def _peer_names(sock: ssl.SSLSocket) -> set[str]:
    cert = sock.getpeercert()
    assert cert is not None
    names = cert.get("subjectAltName", ())
    return {str(pair[1]) for pair in names if pair[0] == "DNS"}


def test_sni_chooses_the_certificate(tampu_server, tmp_path, tampu_ca):
    root = make_config_dir(tmp_path / "conf", ca=tampu_ca)
    issue_cert(tampu_ca, root / "certs", "mail.other.test")
    srv = tampu_server(config_dir=root)
    ctx = srv.client_tls()  # verifies the chain and the name
    for name in ("mail.other.test", "localhost"):
        with RawClient(srv.port("submissions"), tls=ctx, server_hostname=name) as c:
            assert c.reply()[0] == 220
            assert isinstance(c.sock, ssl.SSLSocket)
            assert _peer_names(c.sock) == {name}
        with RawClient(srv.port("smtp")) as c:
            c.reply()
            c.cmd("EHLO client.test")
            c.starttls(ctx, server_hostname=name)
            assert isinstance(c.sock, ssl.SSLSocket)
            assert _peer_names(c.sock) == {name}
            assert c.cmd("EHLO client.test")[0] == 250
    # no SNI: the certificate of [server] hostname (localhost)
    bare = ssl.create_default_context()
    bare.check_hostname = False
    tampu_ca.configure_trust(bare)
    with RawClient(srv.port("submissions"), tls=bare, server_hostname=None) as c:
        c.reply()
        assert isinstance(c.sock, ssl.SSLSocket)
        assert _peer_names(c.sock) == {"localhost"}
    # a name nobody has a certificate for gets the default, and fails verification
    with pytest.raises(ssl.SSLCertVerificationError):
        RawClient(srv.port("submissions"), tls=ctx, server_hostname="unknown.test")


def test_commands_pipelined_before_the_tls_handshake_are_discarded(srv):
    """RFC 3207 4.2 (the STARTTLS command injection of CVE-2011-0411): plaintext sent after
    STARTTLS, before the handshake, must not be executed inside the TLS session."""
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        code, _ = c.reply()
        assert code == 220
        c.sock = srv.client_tls().wrap_socket(c.sock, server_hostname="localhost")
        assert c.cmd("EHLO client.test")[0] == 250
        code, lines = c.cmd("MAIL FROM:<real@example.org>")
        assert code == 250, lines  # not "503 nested MAIL": the injected one never ran
        code, lines = c.cmd("NOOP")
        assert code == 250, lines  # and no stray reply is waiting


def test_failed_handshake_closes_only_that_connection(srv):
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("STARTTLS")[0] == 220
        c.send_raw(b"this is not a TLS ClientHello\r\n" * 4)
        assert c.closed_by_server()
    with RawClient(srv.port("submissions")) as c:  # plaintext on the implicit-TLS port
        c.send_raw(b"EHLO client.test\r\n")
        assert c.closed_by_server(timeout=10)
    with srv.smtp() as c:  # the server is fine
        assert c.ehlo()[0] == 250
    deadline = time.monotonic() + 5
    while srv.server.state.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not srv.server.state.connections


@pytest.mark.parametrize(("listener", "starttls"), [("submission", "on"),
                                                    ("submissions", "off")])
def test_msmtp_sends_with_tls_and_auth(srv, tmp_path, tampu_ca, listener, starttls):
    """A real mail client (msmtp) submits over STARTTLS and over implicit TLS, verifying the
    server's certificate against the test CA, with AUTH; the message reaches the queue."""
    msmtp = require_tool("msmtp")
    ca_file = tmp_path / "ca.pem"
    tampu_ca.cert_pem.write_to_path(str(ca_file))
    conf = tmp_path / "msmtprc"
    conf.write_text(textwrap.dedent(f"""\
        account tampu
        host localhost
        port {srv.port(listener)}
        domain client.test
        tls on
        tls_starttls {starttls}
        tls_trust_file {ca_file}
        auth plain
        user {USER}
        password {PASSWORD}
        from {USER}
        account default : tampu
        """))
    conf.chmod(0o600)
    before = set(srv.queue_items())
    done = subprocess.run(
        [msmtp, "-C", str(conf), "friend@remote.example"],
        input=f"From: {USER}\nTo: friend@remote.example\nSubject: via msmtp {listener}\n\nhi\n",
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    new = set(srv.queue_items()) - before
    assert len(new) == 1
    header, message = read_queue_item(srv, new.pop())
    assert header["auth_user"] == USER
    assert f"Subject: via msmtp {listener}".encode() in message
