"""Helpers for the remote delivery tests: receiving MX servers (aiosmtpd) on 127.0.0.x, one port.

delivery_smtp has one ``port`` setting, so every test MX listens on the same port on its own
loopback address (127.0.0.2, 127.0.0.3, ...); an address where nothing listens is a "down" MX.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from tampu.testing import RunningServer, server_toml

USER = "user@example.test"
PASSWORD = "secret"


def free_port(host: str = "127.0.0.2", others: tuple[str, ...] = ("127.0.0.3", "127.0.0.4")
              ) -> int:
    """A port free on ``host`` (bound to 0 there) and, as checked, on ``others`` too."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        try:
            for other in others:
                with socket.socket() as probe:
                    probe.bind((other, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on all test MX addresses")


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    helo: str


@dataclass
class Sink:
    """An aiosmtpd handler that records what it receives and answers as told."""

    rcpt_replies: list[str] = field(default_factory=list)
    """Replies for the next RCPT commands, first one first; empty: accept."""
    received: list[Received] = field(default_factory=list)
    rcpt_seen: list[str] = field(default_factory=list)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        self.rcpt_seen.append(address)
        if self.rcpt_replies:
            reply = self.rcpt_replies.pop(0)
            if not reply.startswith("250"):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(Received(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
            content=bytes(envelope.original_content), tls=session.ssl is not None,
            helo=session.host_name))
        return "250 2.0.0 Stored"


class SinkController(Controller):
    """An aiosmtpd Controller that closes the sessions still open when it stops: tampu keeps
    idle connections open for the next message (delivery_smtp's pool), and a Controller
    stops its loop without closing them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sessions: list[Any] = []

    def factory(self) -> Any:
        smtp = super().factory()
        self.sessions.append(smtp)
        return smtp

    def stop(self, no_assert: bool = False) -> None:
        closed = threading.Event()

        def close_all() -> None:
            for smtp in self.sessions:
                for transport in (smtp.transport, smtp._original_transport):
                    if transport is not None and not transport.is_closing():
                        transport.close()
            closed.set()

        if self.loop.is_running():
            self.loop.call_soon_threadsafe(close_all)
            closed.wait(5)
        super().stop(no_assert)


class MXFarm:
    """Receiving SMTP servers on 127.0.0.x:port, started and stopped per test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.running: dict[str, Controller] = {}

    def start(self, host: str, sink: Sink | None = None, *,
              tls: ssl.SSLContext | None = None) -> Sink:
        sink = sink or Sink()
        kwargs: dict[str, Any] = {"tls_context": tls, "require_starttls": False} if tls else {}
        ctl = SinkController(sink, hostname=host, port=self.port,
                             server_hostname=f"mx-{host}", ready_timeout=5, **kwargs)
        ctl.start()
        self.running[host] = ctl
        return sink

    def stop(self, host: str) -> None:
        self.running.pop(host).stop()

    def stop_all(self) -> None:
        for host in list(self.running):
            self.stop(host)


def server_tls(ca: Any, *names: str) -> ssl.SSLContext:
    """A server context with a certificate from the trustme ``ca`` for ``names``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def write_ca(ca: Any, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def remote_conf(dns_port: int, mx_port: int, *, ca_file: Path | None = None,
                domaininfo: bool = True, smtp_extra: str = "") -> dict[str, Any]:
    """Keyword arguments for ``tampu_server``: DNS, delivery_smtp towards the farm's port."""
    ca_line = f'tls_ca_file = "{ca_file}"' if ca_file else ""
    conf = f"""
[plugins.delivery_smtp]
enabled = true
port = {mx_port}
{ca_line}
connect_timeout = 3
command_timeout = 3
data_timeout = 3
{smtp_extra}

[plugins.domaininfo]
enabled = {"true" if domaininfo else "false"}
"""
    return {
        "base": server_toml(extra=f'dns_servers = ["127.0.0.1:{dns_port}"]'),
        "conf": {"45-delivery-remote.toml": conf},
        "users": {USER: PASSWORD},
        "deliver": True,
    }


def submit(srv: RunningServer, rcpts: list[str], *, body: bytes | None = None,
           sender: str = USER) -> None:
    """Send as the authenticated test user over submission (STARTTLS + AUTH), so it may relay."""
    body = body or b"From: user@example.test\r\nSubject: remote\r\n\r\nhello out there\r\n"
    with srv.smtp("submission") as client:
        client.ehlo()
        client.starttls(context=srv.client_tls())
        client.ehlo()
        client.login(USER, PASSWORD)
        refused = client.sendmail(sender, rcpts, body)
        assert not refused, refused
