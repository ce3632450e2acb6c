"""One SMTP connection below the dialogue: the session's life (PROXY header, limits, the
connect verdict, the greeting, the disconnect), its TLS handshakes, the replies and their error
budget, the verdict notifications, and the command loop that hands each command to the
dialogue (:class:`tampu.smtp.SmtpSession`, which implements the commands).

Past ``[server] max_errors`` 5xx replies the session gets ``421`` and is closed; a peer that
is not speaking SMTP (an HTTP request, a TLS ClientHello on a plain port) is closed at once.
On the local socket (``tampu sendmail``) the session knows its user from the socket's peer
credentials and offers neither STARTTLS nor AUTH.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tampu import reply as R
from tampu.envelope import Envelope, ListenerInfo, Session, Stage, Verdict
from tampu.errors import PluginError
from tampu.intake import Intake
from tampu.reply import Reply, with_enhanced_code
from tampu.smtp_memory import MemoryBudget
from tampu.smtp_params import tls_info
from tampu.smtp_proxy import IPNetwork, read_proxy_header
from tampu.smtp_wire import Closed, ForeignProtocol, LineTooLong, NotTls, Wire

if TYPE_CHECKING:
    from tampu.config import ServerSettings
    from tampu.facade import Hooks
    from tampu.state import ServerState

log = logging.getLogger("tampu.smtp")

_HTTP = re.compile(rb"^(GET|POST|HEAD|PUT|DELETE|OPTIONS|CONNECT|PATCH|TRACE) \S+ HTTP/\d")
_NOT_SMTP_START = (b"\x16\x03", b"\x80")  # a TLS or SSLv2 ClientHello on a plain port
NOT_TLS = Reply(500, "5.5.1", "TLS handshake expected after 220 to STARTTLS; closing connection")
DEFAULT_BUDGET = MemoryBudget()
"""The budget of sessions made without one (each Server has its own)."""


class NotSmtp(Exception):
    """The peer speaks another protocol."""


class SmtpConnection(Wire):
    """One SMTP connection on one listener; the dialogue's commands come from
    :meth:`command_table`."""



    def __init__(self, state: ServerState, intake: Intake, listener: ListenerInfo,
                 tls: ssl.SSLContext | None, proxy_trusted: list[IPNetwork] | None,
                 budget: MemoryBudget | None = None) -> None:
        settings = state.runtime.config.server
        super().__init__(settings.max_line_length)
        self.state = state
        self.intake = intake
        self.listener = listener
        self.tls = tls if listener.kind != "local" else None
        self.implicit_tls = listener.kind == "submissions"
        self.offers_starttls = self.tls is not None and not self.implicit_tls
        self.needs_auth = listener.kind in ("submission", "submissions")
        self.proxy_trusted = proxy_trusted
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self.errors = 0
        self.refused_rcpts = 0
        self.waiting = False
        self.handshaking = False
        self.session_end = 0.0
        self.budget = budget if budget is not None else DEFAULT_BUDGET

    # ---------------------------------------------------------------- lifecycle

    def connection_made(self, transport: Any) -> None:  # noqa: ANN401 - asyncio's API
        super().connection_made(transport)
        if self.listener.kind == "local":
            self.session = Session(peer_host="localhost", peer_port=0, listener=self.listener,
                                   local_user=local_user(transport))
        else:
            try:
                peer = transport.get_extra_info("peername") or ("", 0)
            except (AttributeError, OSError):  # uvloop: the socket is already gone
                peer = ("", 0)
            self.session = Session(peer_host=str(peer[0]), peer_port=int(peer[1]),
                                   listener=self.listener)
        if transport.get_extra_info("ssl_object") is not None:  # implicit TLS: done already
            self.session.tls = tls_info(transport)
        self.state.connections.add(self)
        self.state.spawn(self._serve())

    @property
    def idle(self) -> bool:
        """Waiting for a command outside a transaction (or in a TLS handshake): safe to close
        at shutdown."""
        return (self.waiting and self.envelope is None) or self.handshaking

    def close_for_shutdown(self) -> None:
        if not self.handshaking:  # no plain text into a TLS handshake
            self.write(f"{R.SHUTTING_DOWN}\r\n".encode())
        self.abort()

    @property
    def settings(self) -> ServerSettings:
        return self.state.runtime.config.server

    @property
    def hooks(self) -> Hooks:
        return self.state.runtime.hooks

    @property
    def memory_limit(self) -> int:
        """Bytes of message bodies the sessions of this process may hold at once (never less
        than one message of the largest size)."""
        settings = self.settings
        return max(settings.reception_memory, settings.max_message_size)

    async def _serve(self) -> None:
        assert self.session is not None
        session = self.session
        connected = False
        self.session_end = self.loop.time() + self.settings.session_timeout
        try:
            if self.proxy_trusted is not None and not await read_proxy_header(self):
                return
            if len(self.state.connections) > self.settings.max_connections:
                return self.reply(R.TOO_MANY_CONNECTIONS)
            if self.state.stopping:
                return self.reply(R.SHUTTING_DOWN)
            connected = True
            if session.tls is not None:
                await self._call(self.hooks.smtp_starttls(session))
            start = time.perf_counter()
            try:
                refusal, plugin = await self.hooks.smtp_connect(session)
            except PluginError as exc:
                refusal, plugin = Reply(421, "4.3.0", "Local error, try again later"), exc.plugin
            if refusal is not None:
                await self._verdict("connect", refusal, plugin, "", start)
                return self.reply(refusal)
            self.write(f"220 {self.settings.hostname} ESMTP tampu\r\n".encode())
            await self._commands()
        except (Closed, ConnectionError):
            pass
        except (NotSmtp, ForeignProtocol):
            log.info("session %s: %s is not speaking SMTP; closed", session.id,
                     session.peer_host)
        except Exception:  # a bug: say so once, with the session, and close
            log.exception("session %s: internal error", session.id)
        finally:
            if self.expired:
                log.info("session %s: %s from %s; closed", session.id,
                         "deadline passed" if self.expired == "timeout" else self.expired,
                         session.peer_host)
            self.state.connections.discard(self)
            self.close()
            if connected:
                try:
                    await self.hooks.smtp_disconnect(session)
                except Exception:  # noqa: S110 - notification failures are logged there
                    pass

    async def _call(self, awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except PluginError:
            pass

    async def _handshake(self) -> bool:
        assert self.session is not None and self.tls is not None
        self.handshaking = True
        try:
            await self.start_tls(self.tls, self.settings.tls_handshake_timeout)
        except NotTls:
            log.info("session %s: %s sent plain text instead of a TLS handshake; closed",
                     self.session.id, self.session.peer_host)
            await self._refuse_plaintext()
            return False
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("session %s: TLS handshake with %s failed: %s", self.session.id,
                     self.session.peer_host, str(exc) or type(exc).__name__)
            return False
        finally:
            self.handshaking = False
        assert self.transport is not None
        self.session.tls = tls_info(self.transport)
        return True

    async def _refuse_plaintext(self) -> None:
        """A command in plain text where the TLS handshake should be: answer it, close."""
        try:
            await self.readline(self.loop.time() + self.settings.tls_handshake_timeout)
        except (Closed, LineTooLong):
            pass
        self.reply(NOT_TLS)
        self.close()

    # ---------------------------------------------------------------- replies

    def reply(self, reply: Reply) -> None:
        if reply.code >= 500:
            self.errors += 1
        self.write(self.encode(reply))

    @staticmethod
    def encode(reply: Reply) -> bytes:
        """The reply's lines as sent."""
        text = str(reply)
        if not reply.status:  # a plugin's reply without an enhanced code gets one (RFC 2034)
            text = "\r\n".join(with_enhanced_code(line) for line in text.split("\r\n"))
        return (text + "\r\n").encode("ascii", "replace")

    def socket_for_syncer(self) -> int:
        """The client socket's descriptor, on which the queue's syncer may write the next
        reply itself now (:attr:`tampu.store.Durable.socket`), or -1: TLS (STARTTLS or
        implicit: the transport is then an SSL one), output pending, or closing."""
        transport = self.transport
        if (self._out or transport is None or transport.is_closing()
                or transport.get_write_buffer_size()
                or transport.get_extra_info("ssl_object") is not None):
            return -1
        sock = transport.get_extra_info("socket")
        return sock.fileno() if sock is not None else -1

    async def _verdict(self, stage: Stage, reply: Reply, plugin: str | None, address: str,
                       start: float) -> None:
        if self.hooks.has("smtp_verdict"):
            assert self.session is not None
            verdict = Verdict(stage, reply, plugin or "core", address,
                              time.perf_counter() - start)
            await self._call(self.hooks.smtp_verdict(self.session, self.envelope, verdict))

    # ---------------------------------------------------------------- command loop

    async def _commands(self) -> None:
        table = self.command_table()
        while not self.closed:
            if self.errors >= self.settings.max_errors:  # after the reply that made it so
                log.info("session %s: %d errors from %s; closed", self.session.id if
                         self.session else "?", self.errors,
                         self.session.peer_host if self.session else "?")
                self.errors = 0
                self.reply(R.TOO_MANY_ERRORS)
                return self.close()
            self.waiting = True
            try:
                deadline = min(self.loop.time() + self.settings.command_timeout,
                               self.session_end)
                line = await self.readline(deadline, _NOT_SMTP_START)
            except LineTooLong:
                self.waiting = False
                self.reply(R.LINE_TOO_LONG)
                continue
            self.waiting = False
            verb, _, rest = line.partition(b" ")
            handler = table.get(verb.upper())
            if handler is None:
                if _HTTP.match(line) or line.startswith(_NOT_SMTP_START):
                    raise NotSmtp()
                self.reply(Reply(500, "5.5.1", "Command unrecognized"))
                continue
            try:
                arg = rest.decode("utf-8")
            except UnicodeDecodeError:
                if verb.upper() in (b"MAIL", b"RCPT"):
                    status = "5.1.7" if verb.upper() == b"MAIL" else "5.1.3"
                    self.reply(Reply(501, status, "Address is not valid UTF-8"))
                    continue
                if verb.upper() in (b"HELO", b"EHLO", b"VRFY"):
                    what = "Address" if verb.upper() == b"VRFY" else "Host name"
                    self.reply(Reply(501, "5.5.2", f"{what} is not valid UTF-8"))
                    continue
                arg = rest.decode("utf-8", "replace")
            await handler(arg)
            if self.loop.time() > self.session_end and not self.closed:
                self.reply(Reply(421, "4.4.2", "Session too long, closing connection"))
                return self.close()

    def command_table(self) -> dict[bytes, Callable[[str], Awaitable[None]]]:
        """The commands, by upper-case verb."""
        raise NotImplementedError


def local_user(transport: Any) -> str:  # noqa: ANN401 - an asyncio or uvloop transport
    """The login of the process at the other end of a UNIX socket (SO_PEERCRED), else
    ``uid N``; ``unknown`` when the kernel does not say."""
    import pwd
    import socket
    import struct

    sock = transport.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
    except (AttributeError, OSError):
        return "unknown"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
