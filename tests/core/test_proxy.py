"""PROXY protocol v1 and v2 on a listener that enables it: raw sockets from trusted and
untrusted addresses (127.0.0.1 is the trusted proxy, 127.0.0.2 is not)."""

from __future__ import annotations

import socket
import struct

import pytest

from tampu import Session, hookimpl
from tampu.errors import ConfigError

USER = "user@example.test"
PROXY = '[server.listeners.smtp]\nproxy_protocol = true\nproxy_trusted = ["127.0.0.1/32"]\n'
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class Seen:
    """Records the client address plugins are shown at connect."""

    name = "seen"

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []

    @hookimpl
    def smtp_connect(self, session: Session) -> None:
        self.peers.append((session.peer_host, session.peer_port))


def v1(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 25) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = "::1" if ":" in src else dst
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str | None, sport: int = 0, dst: str = "127.0.0.1", dport: int = 25) -> bytes:
    if src is None:  # LOCAL command: the proxy's own connection (health check)
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if ":" in src:
        body = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, "::1")
                + struct.pack("!HH", sport, dport))
        fam = 0x21
    else:
        body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
        fam = 0x11
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


class Raw:
    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes]:
        lines: list[bytes] = []
        while True:
            try:
                line = self.file.readline()
            except ConnectionResetError:  # closed with our bytes unread
                line = b""
            if not line:
                return 0, b"".join(lines)  # closed
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    def cmd(self, line: str) -> int:
        self.send(line.encode() + b"\r\n")
        return self.reply()[0]


def transaction(raw: Raw) -> str:
    assert raw.reply()[0] == 220
    assert raw.cmd("EHLO proxied.test") == 250
    assert raw.cmd("MAIL FROM:<a@example.org>") == 250
    assert raw.cmd(f"RCPT TO:<{USER}>") == 250
    assert raw.cmd("DATA") == 354
    raw.send(b"Subject: proxied\r\n\r\nhello\r\n.\r\n")
    code, text = raw.reply()
    assert code == 250, text
    raw.cmd("QUIT")
    return text.decode().split()[-1]


@pytest.fixture
def proxied(tampu_server):
    seen = Seen()
    srv = tampu_server(conf={"10-proxy.toml": PROXY}, users={USER: "x"}, plugins=[seen])
    return srv, seen


@pytest.mark.parametrize("header, client", [
    (v1("203.0.113.7", 40000), ("203.0.113.7", 40000)),
    (v1("2001:db8::7", 40001), ("2001:db8::7", 40001)),
    (v2("198.51.100.9", 40002), ("198.51.100.9", 40002)),
    (v2("2001:db8::9", 40003), ("2001:db8::9", 40003)),
])
def test_trusted_proxy_gives_the_client_address(proxied, header, client):
    srv, seen = proxied
    raw = Raw(srv.port())
    try:
        raw.send(header)
        qid = transaction(raw)
    finally:
        raw.close()
    assert seen.peers == [client]  # what plugins see
    item = srv.store.load_now(qid)
    assert item.peer == client[0]  # what the queue (and so delivery, logs) records
    assert client[0].encode() in srv.store.read_message_now(qid)  # Received: header


def test_v2_local_keeps_the_proxy_address(proxied):
    srv, seen = proxied
    raw = Raw(srv.port())
    try:
        raw.send(v2(None))
        transaction(raw)
    finally:
        raw.close()
    assert seen.peers[0][0] == "127.0.0.1"


@pytest.mark.parametrize("header", [v1("203.0.113.7", 40000), v2("203.0.113.7", 40000)])
def test_untrusted_source_is_disconnected(proxied, header):
    srv, seen = proxied
    raw = Raw(srv.port(), source="127.0.0.2")
    try:
        raw.send(header)
        assert raw.reply() == (0, b"")  # closed, no greeting
    finally:
        raw.close()
    assert seen.peers == []


@pytest.mark.parametrize("first", [b"EHLO x\r\n", b"PROXY TCP4 nonsense\r\n",
                                   V2_SIGNATURE + b"\x99\x11\x00\x00"])
def test_trusted_source_without_a_valid_header_is_disconnected(proxied, first):
    srv, seen = proxied
    raw = Raw(srv.port())
    try:
        raw.send(first)
        assert raw.reply() == (0, b"")
    finally:
        raw.close()
    assert seen.peers == []


def test_other_listeners_do_not_take_proxy_headers(proxied):
    srv, seen = proxied
    raw = Raw(srv.port("submission"))
    port = raw.sock.getsockname()[1]
    try:
        assert raw.reply()[0] == 220  # greets at once: no PROXY expected here
        raw.send(v1("203.0.113.7", 40000))
        assert raw.reply()[0] == 500
    finally:
        raw.close()
    assert seen.peers == [("127.0.0.1", port)]


def test_proxy_on_submissions_is_refused(tampu_server):
    conf = "[server.listeners.submissions]\nproxy_protocol = true\n"
    with pytest.raises(ConfigError, match="submissions.*proxy_protocol|proxy_protocol.*"
                                          "submissions"):
        tampu_server(conf={"10-proxy.toml": conf})


def test_bad_trusted_network_names_the_key(tampu_server):
    conf = '[server.listeners.smtp]\nproxy_protocol = true\nproxy_trusted = ["10.0.0.300/8"]\n'
    with pytest.raises(ConfigError, match="server.listeners.smtp.proxy_trusted"):
        tampu_server(conf={"10-proxy.toml": conf})
