"""dovecot_auth: AUTH and RCPT checks against a real Dovecot's auth service.

Each test module run starts its own ``dovecot -F`` (tests/plugins/dovecot_kit.py) in a
temporary directory; without dovecot installed the tests skip, and fail under
TAMPU_REQUIRE_TOOLS=1.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tampu import hookimpl
from tampu.plugins.dovecot_auth import DovecotAuthSettings
from tampu.plugins.dovecot_auth.client import (
    DEFAULT_CLIENT_PATHS,
    DEFAULT_USERDB_PATHS,
    DovecotAuth,
    find_socket,
    is_safe_username,
    tab_escape,
    tab_unescape,
)
from tampu.testing import server_toml
from tests.plugins.dovecot_kit import DovecotServer, hash_password

DOMAIN = "dove.test"      # a local domain without a users file: Dovecot's
FILE_DOMAIN = "example.test"  # a local domain with a users file: tampu's own

USERS = {
    f"alice@{DOMAIN}": "{PLAIN}alice secret",
    f"carol@{DOMAIN}": "{PLAIN}carol secret",
    f"onlydovecot@{FILE_DOMAIN}": "{PLAIN}od secret",
}


@pytest.fixture(scope="module")
def dovecot():
    users = dict(USERS)
    users[f"bob@{DOMAIN}"] = hash_password("bob secret")  # SHA512-CRYPT, as doveadm makes it
    with DovecotServer.temporary(users, realm=DOMAIN) as server:
        yield server


@pytest.fixture
def make_dovecot():
    started: list[DovecotServer] = []

    def factory(**kwargs) -> DovecotServer:
        server = DovecotServer.temporary(dict(USERS), **kwargs)
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        server.cleanup()


def client_for(dovecot: DovecotServer, timeout: float = 5) -> DovecotAuth:
    return DovecotAuth(dovecot.userdb, dovecot.client, timeout)


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------ protocol escaping


@given(st.text())
def test_tab_escape_round_trip_and_single_field(value):
    escaped = tab_escape(value)
    assert tab_unescape(escaped) == value
    assert not any(ch in escaped for ch in "\t\r\n")
    line = f"USER\t1\t{escaped}\tservice=smtp"
    assert line.split("\t") == ["USER", "1", escaped, "service=smtp"]


def test_tab_escape_is_dovecots():
    assert tab_escape("a\tb\nc\rd\x01e") == "a\x01tb\x01nc\x01rd\x011e"
    assert tab_unescape("x\x010y") == "x\x00y"
    assert is_safe_username("alice@dove.test")
    for bad in ("", "a b", "a\tb", "a\nb", "a\x01b", "a\u00a0b", "a\u200bb"):
        assert not is_safe_username(bad), repr(bad)


# ------------------------------------------------------------------------ the client, for real


def test_authenticate_right_wrong_and_unknown(dovecot):
    client = client_for(dovecot)
    assert run(client.authenticate(f"alice@{DOMAIN}", "alice secret")) is True
    assert run(client.authenticate(f"alice@{DOMAIN}", "alice secreT")) is False
    assert run(client.authenticate(f"bob@{DOMAIN}", "bob secret")) is True  # SHA512-CRYPT
    assert run(client.authenticate(f"bob@{DOMAIN}", "alice secret")) is False
    assert run(client.authenticate(f"nobody@{DOMAIN}", "alice secret")) is False
    answer = run(client.check_password(f"alice@{DOMAIN}", "alice secret",
                                       remote_ip="192.0.2.7", local_ip="127.0.0.1"))
    assert answer.ok is True and answer.user == f"alice@{DOMAIN}"
    # rip reaches Dovecot: its log names the client address of a failed login
    assert run(client.check_password(f"alice@{DOMAIN}", "bad", remote_ip="192.0.2.7")).ok \
        is False
    assert f"(alice@{DOMAIN},192.0.2.7)" in dovecot.log()


def test_exists(dovecot):
    client = client_for(dovecot)
    assert run(client.exists(f"alice@{DOMAIN}")) is True
    assert run(client.exists(f"bob@{DOMAIN}")) is True
    assert run(client.exists(f"nobody@{DOMAIN}")) is False
    assert run(client.exists("")) is False


def test_login_without_domain_gets_dovecots_name(dovecot):
    # auth_default_realm = dove.test: Dovecot completes the name and says so in user=.
    client = client_for(dovecot)
    answer = run(client.check_password("alice", "alice secret"))
    assert answer.ok is True and answer.user == f"alice@{DOMAIN}"
    assert run(client.exists("carol")) is True


def test_tabs_and_newlines_cannot_inject(dovecot):
    client = client_for(dovecot)
    # Unescaped, the tab would end the user field and Dovecot would look up alice.
    assert run(client.exists(f"alice@{DOMAIN}\tx=y")) is False
    # Unescaped, the newline would start a second USER request for alice.
    assert run(client.exists(f"nobody@{DOMAIN}\nUSER\t1\talice@{DOMAIN}")) is False
    assert run(client.exists(f"alice@{DOMAIN}\x01t")) is False
    assert run(client.exists(f"alice\x00@{DOMAIN}")) is False
    # In PLAIN the name is inside base64; Dovecot refuses the characters itself.
    assert run(client.authenticate(f"alice@{DOMAIN}\t", "alice secret")) is False
    assert run(client.authenticate(f"alice@{DOMAIN}\x00x", "alice secret")) is False
    assert run(client.authenticate(f"alice@{DOMAIN}", "alice secret\x00x")) is False
    # ...and the connection is still healthy for the next request.
    assert run(client.exists(f"alice@{DOMAIN}")) is True


def test_dovecot_backend_failure_is_temporary(dovecot):
    client = client_for(dovecot)
    answer = run(client.check_password(f"tempfail@{DOMAIN}", "x"))
    assert answer.ok is None and "temp" in answer.detail
    assert run(client.exists(f"tempfail@{DOMAIN}")) is None


def test_absent_socket_is_temporary(tmp_path):
    client = DovecotAuth(str(tmp_path / "no-userdb"), str(tmp_path / "no-client"), 2)
    assert run(client.exists("alice@dove.test")) is None
    assert run(client.authenticate("alice@dove.test", "pw")) is None
    plain_file = tmp_path / "not-a-socket"
    plain_file.write_text("")
    client = DovecotAuth(str(plain_file), str(plain_file), 2)
    assert run(client.exists("alice@dove.test")) is None
    assert run(client.authenticate("alice@dove.test", "pw")) is None


class UnixServer:
    """A real UNIX socket server with a scripted behaviour (silent, garbage, closing)."""

    def __init__(self, path: Path, greeting: bytes = b"", close: bool = False) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.greeting = greeting
        self.close_at_once = close
        self.conns: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            if self.greeting:
                conn.sendall(self.greeting)
            if self.close_at_once:
                conn.close()
            else:
                self.conns.append(conn)

    def __enter__(self) -> UnixServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_silent_server_is_bounded_in_time(tmp_path):
    with UnixServer(tmp_path / "silent"):
        client = DovecotAuth(str(tmp_path / "silent"), str(tmp_path / "silent"), 0.5)
        start = time.monotonic()
        assert run(client.exists("alice@dove.test")) is None
        assert run(client.authenticate("alice@dove.test", "pw")) is None
        assert time.monotonic() - start < 3


@pytest.mark.parametrize("greeting", [
    b"VERSION\t2\t0\nSPID\t1\n",                     # another major version
    b"VERSION\t1\t1\nMECH\tLOGIN\tplaintext\nSPID\t1\nDONE\n",  # no PLAIN
    b"VERSION\t1\t1\nSPID\t1\nDONE\nCONT\t1\t\nUSER\t1\tx\n",   # CONT: not for PLAIN+resp
    b"\xff" * 70000,                                  # an endless line
])
def test_protocol_errors_are_temporary(tmp_path, greeting):
    path = tmp_path / "odd"
    with UnixServer(path, greeting=greeting):
        client = DovecotAuth(str(path), str(path), 2)
        assert run(client.authenticate("alice@dove.test", "pw")) is None


def test_connection_closed_and_refused_are_temporary(tmp_path):
    path = tmp_path / "closing"
    with UnixServer(path, close=True):
        client = DovecotAuth(str(path), str(path), 2)
        assert run(client.exists("alice@dove.test")) is None
        assert run(client.authenticate("alice@dove.test", "pw")) is None
    # The socket file is left behind with nobody listening: ECONNREFUSED.
    assert path.exists()
    client = DovecotAuth(str(path), str(path), 2)
    assert run(client.exists("alice@dove.test")) is None
    assert run(client.authenticate("alice@dove.test", "pw")) is None


# ------------------------------------------------------------------------ autodetection


def test_default_paths_are_chasquids():
    assert DEFAULT_USERDB_PATHS == ("/var/run/dovecot/auth-chasquid-userdb",
                                    "/var/run/dovecot/auth-userdb")
    assert DEFAULT_CLIENT_PATHS == ("/var/run/dovecot/auth-chasquid-client",
                                    "/var/run/dovecot/auth-client")


def test_autodetection_order(tmp_path):
    first, second = tmp_path / "auth-chasquid-userdb", tmp_path / "auth-userdb"
    candidates = (str(first), str(second))
    assert find_socket(candidates) is None
    with UnixServer(second):
        assert find_socket(candidates) == str(second)
        first.write_text("")  # a regular file is not a socket
        assert find_socket(candidates) == str(second)
        first.unlink()
        with UnixServer(first):
            assert find_socket(candidates) == str(first)  # the chasquid listener wins
    client = DovecotAuth("", "", userdb_candidates=candidates)
    assert client.userdb_socket() == str(first)
    assert DovecotAuth(str(second), "", userdb_candidates=candidates).userdb_socket() == \
        str(second)  # a configured path is used as it is


def test_autodetected_sockets_of_a_real_dovecot(dovecot, tmp_path):
    missing = str(tmp_path / "missing")
    client = DovecotAuth(
        "", "", 5,
        userdb_candidates=(missing, str(dovecot.socket("auth-chasquid-userdb")),
                           dovecot.userdb),
        client_candidates=(missing, str(dovecot.socket("auth-chasquid-client")),
                           dovecot.client))
    assert client.userdb_socket() == str(dovecot.socket("auth-chasquid-userdb"))
    assert client.client_socket() == str(dovecot.socket("auth-chasquid-client"))
    assert run(client.exists(f"alice@{DOMAIN}")) is True
    assert run(client.authenticate(f"alice@{DOMAIN}", "alice secret")) is True


def test_no_dovecot_at_all_autodetects_nothing(tmp_path):
    client = DovecotAuth("", "", 1, userdb_candidates=(str(tmp_path / "a"),),
                         client_candidates=(str(tmp_path / "b"),))
    assert client.userdb_socket() is None and client.client_socket() is None
    assert run(client.exists("alice@dove.test")) is None
    assert run(client.authenticate("alice@dove.test", "pw")) is None


# ------------------------------------------------------------------------ settings


def test_settings_domains_are_canonical():
    settings = DovecotAuthSettings(domains=["Dove.TEST.", "xn--fa-hia.de"])
    assert settings.domains == ["dove.test", "faß.de"]
    with pytest.raises(ValidationError):
        DovecotAuthSettings(domains=["not a domain"])
    with pytest.raises(ValidationError):
        DovecotAuthSettings(timeout=0)


# ------------------------------------------------------------------------ over SMTP


class AuthRecorder:
    """Records who each session authenticated as (smtp_auth_result)."""

    name = "auth_recorder"
    priority = 100

    def __init__(self) -> None:
        self.users: list[tuple[str, bool, str | None]] = []

    @hookimpl
    def smtp_auth_result(self, session, login, success, reason):
        self.users.append((login, success, session.auth_user))


def dovecot_conf(dovecot: DovecotServer | None, extra: str = "") -> dict[str, str]:
    userdb = dovecot.userdb if dovecot else "/nonexistent/auth-userdb"
    client = dovecot.client if dovecot else "/nonexistent/auth-client"
    return {"21-dovecot-auth.toml": (
        f'[plugins.dovecot_auth]\nenabled = true\nuserdb_path = "{userdb}"\n'
        f'client_path = "{client}"\ntimeout = 3\n{extra}')}


def start(tampu_server, dovecot, extra="", plugins=None):
    base = server_toml(domains=(FILE_DOMAIN, DOMAIN))
    return tampu_server(base=base, conf=dovecot_conf(dovecot, extra),
                        users={f"local@{FILE_DOMAIN}": "local secret"}, plugins=plugins)


def auth_plain(srv, login: str, password: str) -> int:
    """AUTH PLAIN on the submission listener, after STARTTLS."""
    with srv.smtp("submission") as client:
        client.ehlo()
        client.starttls(context=srv.client_tls())
        client.ehlo()
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {blob}")
        return code


def rcpt(srv, address: str) -> int:
    with srv.smtp() as client:
        client.ehlo()
        code, _ = client.mail("sender@remote.example")
        assert code == 250
        code, _ = client.rcpt(address)
        return code


def test_smtp_auth_against_dovecot(tampu_server, dovecot):
    recorder = AuthRecorder()
    srv = start(tampu_server, dovecot, plugins=[recorder])
    assert auth_plain(srv, f"alice@{DOMAIN}", "alice secret") == 235
    assert auth_plain(srv, "Alice@DOVE.test", "alice secret") == 235
    assert auth_plain(srv, f"bob@{DOMAIN}", "bob secret") == 235
    assert auth_plain(srv, f"alice@{DOMAIN}", "wrong") == 535
    assert auth_plain(srv, f"nobody@{DOMAIN}", "alice secret") == 535
    assert f"(alice@{DOMAIN},127.0.0.1)" in dovecot.log()  # the client's address as rip
    # a domain with a users file stays tampu's: Dovecot's user there is not asked for
    assert auth_plain(srv, f"onlydovecot@{FILE_DOMAIN}", "od secret") == 535
    assert auth_plain(srv, f"local@{FILE_DOMAIN}", "local secret") == 235
    # no @domain: Dovecot's answer (auth_default_realm) names the user
    assert auth_plain(srv, "carol", "carol secret") == 235
    # white space or control characters: refused without a temporary failure
    assert auth_plain(srv, f"alice@{DOMAIN}\t", "alice secret") == 535
    assert auth_plain(srv, "alice\x01t", "alice secret") == 535
    assert recorder.users[:3] == [
        (f"alice@{DOMAIN}", True, f"alice@{DOMAIN}"),
        ("Alice@DOVE.test", True, f"alice@{DOMAIN}"),
        (f"bob@{DOMAIN}", True, f"bob@{DOMAIN}"),
    ]
    assert ("carol", True, f"carol@{DOMAIN}") in recorder.users


def test_smtp_auth_over_auth_login(tampu_server, dovecot):
    srv = start(tampu_server, dovecot)
    with srv.smtp("submissions") as client:
        client.ehlo()
        code, _ = client.docmd("AUTH", "LOGIN " + base64.b64encode(b"alice@dove.test").decode())
        assert code == 334
        code, _ = client.docmd(base64.b64encode(b"alice secret").decode())
        assert code == 235


def test_smtp_rcpt_against_dovecot(tampu_server, dovecot):
    srv = start(tampu_server, dovecot)
    assert rcpt(srv, f"alice@{DOMAIN}") == 250
    assert rcpt(srv, f"Alice+news@{DOMAIN}") == 250   # suffix and case, as localusers
    assert rcpt(srv, f"bob@{DOMAIN}") == 250
    assert rcpt(srv, f"nobody@{DOMAIN}") == 550
    assert rcpt(srv, f"postmaster@{DOMAIN}") == 250    # localusers, not Dovecot
    assert rcpt(srv, f"onlydovecot@{FILE_DOMAIN}") == 550  # users file domain: not Dovecot's
    assert rcpt(srv, f"local@{FILE_DOMAIN}") == 250
    assert rcpt(srv, '"alice x"@dove.test') == 550
    assert rcpt(srv, "someone@remote.example") == 550  # relay: not authenticated


def test_explicit_domains(tampu_server, dovecot):
    srv = start(tampu_server, dovecot, extra=f'domains = ["{FILE_DOMAIN.upper()}"]\n')
    assert rcpt(srv, f"onlydovecot@{FILE_DOMAIN}") == 250
    assert auth_plain(srv, f"onlydovecot@{FILE_DOMAIN}", "od secret") == 235
    assert rcpt(srv, f"alice@{DOMAIN}") == 550  # not listed: not Dovecot's any more


def test_bare_logins_can_be_left_alone(tampu_server, dovecot):
    srv = start(tampu_server, dovecot, extra="bare_logins = false\n")
    assert auth_plain(srv, "carol", "carol secret") == 535  # auth refuses bare logins
    assert auth_plain(srv, f"carol@{DOMAIN}", "carol secret") == 235


def test_dovecot_backend_failure_gives_temporary_replies(tampu_server, dovecot):
    srv = start(tampu_server, dovecot)
    assert auth_plain(srv, f"tempfail@{DOMAIN}", "x") == 454
    assert rcpt(srv, f"tempfail@{DOMAIN}") == 451


def test_dovecot_stopped_gives_temporary_replies(tampu_server, make_dovecot):
    dovecot = make_dovecot()
    srv = start(tampu_server, dovecot)
    assert auth_plain(srv, f"alice@{DOMAIN}", "alice secret") == 235
    assert rcpt(srv, f"alice@{DOMAIN}") == 250
    dovecot.stop()
    assert auth_plain(srv, f"alice@{DOMAIN}", "alice secret") == 454
    assert rcpt(srv, f"alice@{DOMAIN}") == 451
    assert rcpt(srv, f"postmaster@{DOMAIN}") == 250  # RFC 5321: postmaster still accepted
    # tampu's own users do not depend on Dovecot
    assert auth_plain(srv, f"local@{FILE_DOMAIN}", "local secret") == 235
    dovecot.start()  # back: answers again, without restarting tampu
    assert auth_plain(srv, f"alice@{DOMAIN}", "alice secret") == 235


def test_no_dovecot_sockets_at_start(tampu_server):
    srv = start(tampu_server, None)
    assert auth_plain(srv, f"alice@{DOMAIN}", "alice secret") == 454
    assert rcpt(srv, f"alice@{DOMAIN}") == 451
    assert auth_plain(srv, f"local@{FILE_DOMAIN}", "local secret") == 235
