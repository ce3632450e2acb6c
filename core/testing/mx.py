"""A fake remote MX: a real SMTP server (aiosmtpd) on loopback that records what it receives
and answers the replies a test chooses, per stage and per recipient, with STARTTLS if asked.

    with FakeMX(tls=tampu_ca, names=("mx.remote.test",)) as mx:
        mx.answer("rcpt", "550 5.1.1 No such user", address="gone@remote.test")
        mx.answer("data", "451 4.3.0 Try later", times=1)     # the first DATA only
        mx.publish(dns, "remote.test")                        # MX and A records for it
        conf = mx.delivery_smtp_conf(ca_file)                  # [plugins.delivery_smtp] at it
        ...
        got = mx.wait_received()[0]                            # Received(mail_from, ...)

``MXHandler`` is the aiosmtpd handler (subclass it to change a command's behaviour); an
``MXFarm`` runs several fake MXes on one port of different loopback addresses (127.0.0.2,
127.0.0.3, ...), as tampu's delivery_smtp connects to one port for every MX.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tampu.testing.dns import DNSServer

Stage = Literal["mail", "rcpt", "data"]


def free_port(host: str = "127.0.0.2", others: tuple[str, ...] = ("127.0.0.3", "127.0.0.4")
              ) -> int:
    """A port free on ``host`` (bound to 0 there) and, as checked, on ``others`` too."""
    for _ in range(20):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
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


def fixed_port(host: str = "127.0.0.1") -> int:
    """A free port below the ephemeral range, for a server that restarts on the same port.

    An ephemeral port may be taken by some client's source port while the server is down
    (even by a client connecting to itself: TCP simultaneous open), and the restart fails.
    """
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def server_tls(ca: Any, *names: str) -> ssl.SSLContext:  # noqa: ANN401 - a trustme.CA
    """A server context with a certificate from the trustme ``ca`` for ``names``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def write_ca(ca: Any, path: Path) -> Path:  # noqa: ANN401 - a trustme.CA
    """The CA's certificate as a PEM file (for ``tls_ca_file``); returns ``path``."""
    ca.cert_pem.write_to_path(str(path))
    return path


@dataclass
class Received:
    """One message the fake MX accepted (or refused at DATA, in ``refused``)."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    helo: str
    reply: str = "250 2.0.0 Stored"


@dataclass
class _Rule:
    stage: Stage
    reply: str
    address: str | None
    times: int | None


@dataclass
class MXHandler:
    """An aiosmtpd handler that records what it receives and answers as told."""

    rcpt_replies: list[str] = field(default_factory=list)
    """Replies for the next RCPT commands, first one first (``250...``: accept); then the
    ``answer`` rules; then accept."""
    received: list[Received] = field(default_factory=list)
    rcpt_seen: list[str] = field(default_factory=list)
    mail_seen: list[str] = field(default_factory=list)
    refused: list[Received] = field(default_factory=list)
    """Messages refused at DATA (by an ``answer("data", ...)`` rule)."""
    rules: list[_Rule] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def answer(self, stage: Stage, reply: str, *, address: str | None = None,
               times: int | None = None) -> None:
        """Answer ``reply`` (``"451 4.7.1 Greylisted"``) at ``stage`` — for ``address``
        only if given (the RCPT's address; at DATA, a transaction that has it; at MAIL, the
        sender) — the next ``times`` times, or always (None). Later rules come after."""
        if stage not in ("mail", "rcpt", "data"):
            raise ValueError(f"stage {stage!r} is not mail, rcpt or data")
        code = reply[:3]
        if not (code.isdigit() and 200 <= int(code) <= 599 and reply[3:4] in ("", " ")):
            raise ValueError(f"not an SMTP reply: {reply!r}")
        with self.lock:
            self.rules.append(_Rule(stage, reply, address.lower() if address else None, times))

    def clear(self) -> None:
        """Forget the rules (and what was received)."""
        with self.lock:
            self.rules.clear()
            self.rcpt_replies.clear()
            self.received.clear()
            self.refused.clear()
            self.rcpt_seen.clear()
            self.mail_seen.clear()

    def _chosen(self, stage: Stage, addresses: list[str]) -> str | None:
        wanted = {a.lower() for a in addresses}
        with self.lock:
            for rule in self.rules:
                if rule.address is not None and rule.address not in wanted:
                    continue
                if rule.stage != stage or rule.times == 0:
                    continue
                if rule.times is not None:
                    rule.times -= 1
                return rule.reply
        return None

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802, ANN401 - aiosmtpd's names and types
                          mail_options: list[str]) -> str:
        self.mail_seen.append(address)
        chosen = self._chosen("mail", [address])
        if chosen is not None and not chosen.startswith("2"):
            return chosen
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return chosen or "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802, ANN401 - aiosmtpd's names and types
                          rcpt_options: list[str]) -> str:
        self.rcpt_seen.append(address)
        if self.rcpt_replies:
            reply = self.rcpt_replies.pop(0)
            if not reply.startswith("250"):
                return reply
        chosen = self._chosen("rcpt", [address])
        if chosen is not None and not chosen.startswith("2"):
            return chosen
        envelope.rcpt_tos.append(address)
        return chosen or "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802, ANN401 - aiosmtpd's names and types
        chosen = self._chosen("data", list(envelope.rcpt_tos)) or "250 2.0.0 Stored"
        got = Received(mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
                       content=bytes(envelope.original_content), tls=session.ssl is not None,
                       helo=session.host_name, reply=chosen)
        (self.received if chosen.startswith("2") else self.refused).append(got)
        return chosen


def closing_controller(handler: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - aiosmtpd objects
    """An aiosmtpd Controller that closes the sessions still open when it stops: tampu keeps
    idle connections open for the next message (delivery_smtp's pool), and a plain
    Controller stops its loop without closing them."""
    return closing_controller_class()(handler, **kwargs)


_CLASS: list[type] = []


def closing_controller_class() -> type:
    if _CLASS:
        return _CLASS[0]
    from aiosmtpd.controller import Controller

    class SinkController(Controller):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sessions: list[Any] = []

        def factory(self) -> Any:  # noqa: ANN401 - an aiosmtpd SMTP
            smtp = super().factory()
            self.sessions.append(smtp)
            return smtp

        def stop(self, no_assert: bool = False) -> None:
            closed = threading.Event()

            def close_all() -> None:
                for smtp in self.sessions:
                    for transport in (smtp.transport, smtp._original_transport):
                        if transport is not None and not transport.is_closing():
                            transport.abort()  # at once, TLS or not
                closed.set()

            if self.loop.is_running():
                self.loop.call_soon_threadsafe(close_all)
                closed.wait(5)
            super().stop(no_assert)

    _CLASS.append(SinkController)
    return SinkController


class FakeMX:
    """One fake MX on ``host:port`` (a free port by default); ``tls``: a trustme CA (a
    certificate for ``names`` is issued) or a server SSLContext, to offer STARTTLS."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *,
                 handler: MXHandler | None = None, tls: Any = None,  # noqa: ANN401 - a trustme.CA or an SSLContext
                 names: tuple[str, ...] = (), require_starttls: bool = False,
                 hostname: str | None = None) -> None:
        self.host = host
        self.port = port or free_port(host, ())
        self.handler = handler or MXHandler()
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            tls = server_tls(tls, *(names or (host, "localhost")))
        self.tls: ssl.SSLContext | None = tls
        self.require_starttls = require_starttls
        self.hostname = hostname or f"mx-{host}"
        self._controller: Any = None

    # ---------------------------------------------------------------- running

    def start(self) -> FakeMX:
        kwargs: dict[str, Any] = {"tls_context": self.tls,
                                  "require_starttls": self.require_starttls} if self.tls else {}
        self._controller = closing_controller(self.handler, hostname=self.host, port=self.port,
                                              server_hostname=self.hostname, ready_timeout=5,
                                              **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> FakeMX:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- what it got

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    @property
    def rcpt_seen(self) -> list[str]:
        return self.handler.rcpt_seen

    def answer(self, stage: Stage, reply: str, *, address: str | None = None,
               times: int | None = None) -> None:
        """See :meth:`MXHandler.answer`."""
        self.handler.answer(stage, reply, address=address, times=times)

    def wait_received(self, count: int = 1, timeout: float = 10) -> list[Received]:
        """The messages received, once there are at least ``count``."""
        from tampu.testing.recorder import wait_for

        return wait_for(lambda: len(self.received) >= count and list(self.received), timeout,
                        f"{count} message(s) at the fake MX {self.address}")

    # ---------------------------------------------------------------- wiring tampu to it

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def publish(self, dns: DNSServer, domain: str, mx_name: str | None = None) -> str:
        """Make this the MX of ``domain`` in ``dns`` (MX ``mx_name``, default ``mx.<domain>``,
        and its address record). Returns the MX name."""
        name = mx_name or f"mx.{domain}"
        dns.mx(domain, name, addresses={name: self.host})
        return name

    def delivery_smtp_conf(self, ca_file: Path | str | None = None, extra: str = "") -> str:
        """A conf.d file enabling tampu's ``delivery_smtp`` towards this port (every MX of
        every domain is reached on it), trusting ``ca_file``, with short timeouts."""
        ca_line = f'tls_ca_file = "{ca_file}"\n' if ca_file else ""
        return (f"[plugins.delivery_smtp]\nenabled = true\nport = {self.port}\n{ca_line}"
                f"connect_timeout = 3\ncommand_timeout = 3\ndata_timeout = 3\n{extra}")


class MXFarm:
    """Fake MXes on 127.0.0.x:port (one port), started and stopped per test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.running: dict[str, FakeMX] = {}

    def start(self, host: str, sink: MXHandler | None = None, *,
              tls: ssl.SSLContext | None = None) -> MXHandler:
        mx = FakeMX(host, self.port, handler=sink, tls=tls).start()
        self.running[host] = mx
        return mx.handler

    def stop(self, host: str) -> None:
        self.running.pop(host).stop()

    def stop_all(self) -> None:
        for host in list(self.running):
            self.stop(host)
