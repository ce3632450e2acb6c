"""The SMTP dialogue (RFC 5321, 3207, 4954, 6531, 3461, 2920, 2034): one task per connection.

The session reads commands through :class:`tampu.smtp_wire.Wire` (bounded buffers,
deadlines), asks the hooks at every stage, tells observers what was decided
(``smtp_verdict``), and hands accepted messages to the intake, which returns the queue ID
for the ``250``. Every reply carries an enhanced status code (RFC 2034) except the greeting
and the answers to HELO/EHLO. Errors are budgeted: past ``[server] max_errors`` the session
gets ``421`` and is closed; a peer that is not speaking SMTP (HTTP, a TLS ClientHello on a
plain port) is closed at once.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tampu import reply as R
from tampu.addresses import PathError, is_literal, parse_path, split_address
from tampu.authres import header_value, results, strip_own
from tampu.envelope import Envelope, ListenerInfo, Message, Session, Stage, TlsInfo, Verdict
from tampu.errors import PluginError, QueueError, QueueFull
from tampu.intake import Intake, Submission
from tampu.received import received_header
from tampu.reply import Reply, with_enhanced_code
from tampu.smtp_auth import authenticate
from tampu.smtp_proxy import IPNetwork, read_proxy_header
from tampu.smtp_wire import (
    TRIM_AFTER,
    Closed,
    ForeignProtocol,
    LineTooLong,
    MemoryBudget,
    NotTls,
    Wire,
    give_memory_back,
)

if TYPE_CHECKING:
    from tampu.caller import Hooks
    from tampu.config import ServerSettings
    from tampu.state import ServerState

log = logging.getLogger("tampu.smtp")

_HTTP = re.compile(rb"^(GET|POST|HEAD|PUT|DELETE|OPTIONS|CONNECT|PATCH|TRACE) \S+ HTTP/\d")
_NOT_SMTP_START = (b"\x16\x03", b"\x80")  # a TLS or SSLv2 ClientHello on a plain port
_ENVID = re.compile(r"^[\x21-\x2a\x2c-\x3c\x3e-\x7e+]{1,100}$")  # xtext (RFC 3461 4.4)
_ORCPT = re.compile(r"^[A-Za-z0-9-]+;[\x21-\x2a\x2c-\x3c\x3e-\x7e+]{1,500}$")
_NOTIFY = re.compile(r"^(NEVER|(SUCCESS|FAILURE|DELAY)(,(SUCCESS|FAILURE|DELAY))*)$", re.I)
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NO_MEMORY = Reply(452, "4.3.1", "Insufficient system storage for the message now, try again "
                                "later")
NOT_TLS = Reply(500, "5.5.1", "TLS handshake expected after 220 to STARTTLS; closing connection")
DEFAULT_BUDGET = MemoryBudget()
"""The budget of sessions made without one (each Server has its own)."""


class NotSmtp(Exception):
    """The peer speaks another protocol."""


class SmtpSession(Wire):
    """One SMTP connection on one listener."""

    def __init__(self, state: ServerState, intake: Intake, listener: ListenerInfo,
                 tls: ssl.SSLContext | None, proxy_trusted: list[IPNetwork] | None,
                 budget: MemoryBudget | None = None) -> None:
        settings = state.runtime.config.server
        super().__init__(settings.max_line_length)
        self.state = state
        self.intake = intake
        self.listener = listener
        self.tls = tls
        self.implicit_tls = listener.kind == "submissions"
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
        text = str(reply)
        if not reply.status:  # a plugin's reply without an enhanced code gets one (RFC 2034)
            text = "\r\n".join(with_enhanced_code(line) for line in text.split("\r\n"))
        self.write((text + "\r\n").encode("ascii", "replace"))

    async def _verdict(self, stage: Stage, reply: Reply, plugin: str | None, address: str,
                       start: float) -> None:
        if self.hooks.has("smtp_verdict"):
            assert self.session is not None
            verdict = Verdict(stage, reply, plugin or "core", address,
                              time.perf_counter() - start)
            await self._call(self.hooks.smtp_verdict(self.session, self.envelope, verdict))

    # ---------------------------------------------------------------- command loop

    async def _commands(self) -> None:
        table: dict[bytes, Callable[[str], Awaitable[None]]] = {
            b"HELO": self.helo, b"EHLO": self.ehlo, b"MAIL": self.mail, b"RCPT": self.rcpt,
            b"DATA": self.data, b"RSET": self.rset, b"NOOP": self.noop, b"QUIT": self.quit,
            b"VRFY": self.vrfy, b"EXPN": self.expn, b"HELP": self.help,
            b"STARTTLS": self.starttls, b"AUTH": self.auth,
        }
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

    # ---------------------------------------------------------------- HELO / EHLO

    async def helo(self, arg: str) -> None:
        await self._greet(arg, esmtp=False)

    async def ehlo(self, arg: str) -> None:
        await self._greet(arg, esmtp=True)

    async def _greet(self, arg: str, *, esmtp: bool) -> None:
        assert self.session is not None
        hostname = arg.strip()
        if not hostname or " " in hostname or not hostname.isprintable():
            return self.reply(Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} "
                                                  "hostname"))
        self.envelope = None
        session = self.session
        session.esmtp = esmtp
        start = time.perf_counter()
        try:
            refusal, plugin = await self.hooks.smtp_helo(session, hostname)
            extra = await self.hooks.smtp_ehlo_capabilities(session) if esmtp else []
        except PluginError as exc:
            await self._verdict("helo", R.PLUGIN_FAILED, exc.plugin, hostname, start)
            return self.reply(R.PLUGIN_FAILED)
        if refusal is not None and not refusal.is_positive:
            await self._verdict("helo", refusal, plugin, hostname, start)
            return self.reply(refusal)
        session.helo = hostname
        name = self.settings.hostname
        if not esmtp:  # RFC 2034 3: no enhanced code in the reply to HELO/EHLO
            return self.write(f"250 {name}\r\n".encode())
        caps = [name, "PIPELINING", f"SIZE {self.settings.max_message_size}", "8BITMIME",
                "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"]
        if self.tls is not None and session.tls is None and not self.implicit_tls:
            caps.append("STARTTLS")
        if session.tls is not None and not session.authenticated:
            caps.append("AUTH PLAIN LOGIN")
        caps.extend(kw for kw in extra if kw not in caps)
        lines = [f"250-{c}" for c in caps[:-1]] + [f"250 {caps[-1]}"]
        self.write(("\r\n".join(lines) + "\r\n").encode("ascii", "replace"))

    # ---------------------------------------------------------------- STARTTLS / AUTH

    async def starttls(self, arg: str) -> None:
        assert self.session is not None
        if self.tls is None:
            return self.reply(Reply(502, "5.5.1", "STARTTLS not available"))
        if self.session.tls is not None:
            return self.reply(Reply(503, "5.5.1", "TLS already active"))
        if arg.strip():
            return self.reply(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        self.write(b"220 2.0.0 Ready to start TLS\r\n")
        if self.discard_input():  # RFC 3207 5: nothing sent before the handshake counts
            log.info("session %s: discarded commands pipelined before the TLS handshake",
                     self.session.id)
        if not await self._handshake():
            raise Closed("handshake failed")
        self.session.helo, self.session.esmtp, self.envelope = None, False, None
        await self._call(self.hooks.smtp_starttls(self.session))

    async def auth(self, arg: str) -> None:
        assert self.session is not None
        session = self.session
        if session.helo is None or not session.esmtp:
            return self.reply(Reply(503, "5.5.1", "AUTH needs EHLO"))
        if session.tls is None:
            return self.reply(R.ENCRYPTION_REQUIRED)
        if session.authenticated:
            return self.reply(Reply(503, "5.5.1", "Already authenticated"))
        if self.envelope is not None:
            return self.reply(Reply(503, "5.5.1", "AUTH not permitted during a transaction"))
        start = time.perf_counter()
        reply, login = await authenticate(self, session, arg)
        await self._verdict("auth", reply, None, login, start)
        self.reply(reply)

    async def challenge(self, prompt: bytes) -> str | None:
        """Send a ``334`` challenge and read the answer (None: cancelled with ``*``)."""
        import base64

        self.write(b"334 " + base64.b64encode(prompt) + b"\r\n")
        line = await self.readline(min(self.loop.time() + self.settings.command_timeout,
                                       self.session_end))
        text = line.decode("ascii", "replace").strip()
        return None if text == "*" else text

    # ---------------------------------------------------------------- transaction

    def postmaster_domain(self) -> str:
        domains = self.state.runtime.context.domains
        if domains.is_local(self.settings.hostname):
            return domains.canonical(self.settings.hostname) or ""
        return min(domains.all(), default="")

    async def mail(self, arg: str) -> None:
        assert self.session is not None
        session = self.session
        if session.helo is None:
            return self.reply(Reply(503, "5.5.1", "Send HELO or EHLO first"))
        if self.envelope is not None:
            return self.reply(Reply(503, "5.5.1", "Nested MAIL command"))
        if self.listener.kind != "smtp" and not session.authenticated:
            return self.reply(R.AUTH_REQUIRED)
        if arg[:5].upper() != "FROM:":
            return self.reply(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        start = time.perf_counter()
        try:
            path = parse_path(arg[5:], sender=True)
            self._check_mail_params(path.params)
        except PathError as exc:
            await self._verdict("mail", exc.reply, None, arg[5:].strip()[:256], start)
            return self.reply(exc.reply)
        if self.state.runtime.store.full():  # early, so no body is sent for nothing
            await self._verdict("mail", R.QUEUE_FULL, None, path.address, start)
            return self.reply(R.QUEUE_FULL)
        declared = path.params.get("SIZE")
        if isinstance(declared, str) and \
                int(declared) > self.budget.available(self.memory_limit):
            await self._verdict("mail", NO_MEMORY, None, path.address, start)
            return self.reply(NO_MEMORY)
        env = Envelope(mail_from=path.address, mail_params=path.params,
                       smtputf8=path.params.get("SMTPUTF8") is True)
        try:
            verdict, plugin = await self.hooks.smtp_mail_from(session, env, path.address,
                                                              path.params)
        except PluginError as exc:
            verdict, plugin = R.PLUGIN_FAILED, exc.plugin
        reply = verdict or R.SENDER_OK
        self.envelope = env  # for the verdict's observers, also when refused
        await self._verdict("mail", reply, plugin, path.address, start)
        if not reply.is_positive:
            self.envelope = None
        self.reply(reply)

    def _check_mail_params(self, params: dict[str, str | bool]) -> None:
        for name, value in params.items():
            if name == "SIZE":
                if not isinstance(value, str) or not value.isdigit():
                    raise PathError(Reply(501, "5.5.4", "Syntax: SIZE=<bytes>"))
                if int(value) > self.settings.max_message_size:
                    raise PathError(R.MESSAGE_TOO_BIG)
            elif name == "BODY":
                if not isinstance(value, str) or value.upper() not in ("7BIT", "8BITMIME"):
                    raise PathError(Reply(555, "5.5.4", "BODY must be 7BIT or 8BITMIME"))
            elif name == "SMTPUTF8":
                if value is not True:
                    raise PathError(Reply(555, "5.5.4", "SMTPUTF8 takes no value"))
            elif name == "RET":
                if not isinstance(value, str) or value.upper() not in ("FULL", "HDRS"):
                    raise PathError(Reply(501, "5.5.4", "RET must be FULL or HDRS"))
            elif name == "ENVID":
                if not isinstance(value, str) or not _ENVID.match(value):
                    raise PathError(Reply(501, "5.5.4", "Syntax: ENVID=<xtext>"))
            elif name != "AUTH":  # RFC 4954 5: AUTH=<mailbox> is accepted and not trusted
                raise PathError(Reply(555, "5.5.4", f"Unsupported parameter {name}"))

    async def rcpt(self, arg: str) -> None:
        assert self.session is not None
        session, env = self.session, self.envelope
        if self.listener.kind != "smtp" and not session.authenticated:
            return self.reply(R.AUTH_REQUIRED)
        if env is None:
            return self.reply(Reply(503, "5.5.1", "Need MAIL before RCPT"))
        if arg[:3].upper() != "TO:":
            return self.reply(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        start = time.perf_counter()
        try:
            path = parse_path(arg[3:], sender=False, postmaster_domain=self.postmaster_domain(),
                              smtputf8=env.smtputf8)
            self._check_rcpt_params(path.params)
            _, domain = split_address(path.address)
            if is_literal(domain) and not self.state.runtime.context.is_local_domain(domain):
                raise PathError(Reply(550, "5.1.2", "Address literals are not accepted here"))
        except PathError as exc:
            await self._verdict("rcpt", exc.reply, None, arg[3:].strip()[:256], start)
            return self._refuse_rcpt(exc.reply)
        if len(env.rcpt_to) >= self.settings.max_recipients:
            await self._verdict("rcpt", R.TOO_MANY_RECIPIENTS, None, path.address, start)
            return self.reply(R.TOO_MANY_RECIPIENTS)
        try:
            verdict, plugin = await self.hooks.smtp_rcpt_to(session, env, path.address,
                                                            path.params)
        except PluginError as exc:
            verdict, plugin = R.PLUGIN_FAILED, exc.plugin
        if verdict is None:
            verdict = R.UNKNOWN_RECIPIENT  # fail closed: nobody accepted it
        await self._verdict("rcpt", verdict, plugin, path.address, start)
        if verdict.is_positive:
            env.rcpt_to.append(path.address)
            env.rcpt_params.append(path.params)
            return self.reply(verdict)
        self._refuse_rcpt(verdict)

    def _refuse_rcpt(self, reply: Reply) -> None:
        self.refused_rcpts += 1
        self.reply(reply)
        if reply.code >= 500 and self.refused_rcpts <= self.settings.free_refused_recipients:
            self.errors -= 1

    def _check_rcpt_params(self, params: dict[str, str | bool]) -> None:
        for name, value in params.items():
            if name == "NOTIFY":
                if not isinstance(value, str) or not _NOTIFY.match(value):
                    raise PathError(Reply(501, "5.5.4", "NOTIFY must be NEVER or "
                                                        "SUCCESS,FAILURE,DELAY"))
            elif name == "ORCPT":
                if not isinstance(value, str) or not _ORCPT.match(value):
                    raise PathError(Reply(501, "5.5.4", "Syntax: ORCPT=addr-type;xtext"))
            else:
                raise PathError(Reply(555, "5.5.4", f"Unsupported parameter {name}"))

    async def data(self, arg: str) -> None:
        assert self.session is not None
        session, env = self.session, self.envelope
        if arg.strip():
            return self.reply(Reply(501, "5.5.4", "Syntax: DATA"))
        if self.listener.kind != "smtp" and not session.authenticated:
            return self.reply(R.AUTH_REQUIRED)
        if env is None:
            return self.reply(Reply(503, "5.5.1", "Need MAIL before DATA"))
        if not env.rcpt_to:
            return self.reply(Reply(554, "5.5.1", "No valid recipients"))
        settings = self.settings
        self.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        limit = settings.max_message_size
        span = max(settings.data_timeout, limit / settings.min_data_rate
                   if settings.min_data_rate else 0.0)
        try:
            result = await self.read_data(limit, self.loop.time() + span,
                                          settings.min_data_rate, self.budget,
                                          self.memory_limit, settings.data_timeout)
        except Closed as exc:
            if str(exc) == "too slow":
                self.expired = "too slow a transfer"
                self.write(b"421 4.4.2 Transfer too slow, closing connection\r\n")
            raise
        self.envelope = None
        start = time.perf_counter()
        size, held = result.size, result.held
        try:
            if result.message is None:
                reply = R.MESSAGE_TOO_BIG if result.too_big else R.LINE_TOO_LONG \
                    if result.line_too_long else NO_MEMORY
                queue_id, plugin = None, None
                if result.no_memory:
                    log.warning("session %s: reception memory (%d bytes) in use; a message "
                                "from %s refused with 452", session.id, self.memory_limit,
                                session.peer_host)
            else:  # no reference here: the received bytes go as soon as they are queued
                reply, queue_id, plugin = await self._accept(session, env,
                                                             Message(result.take()))
        finally:
            self.budget.give(held)
            if size >= TRIM_AFTER:
                give_memory_back(self.loop)
        await self._verdict("data", reply, plugin, "", start)
        self._log_transaction(session, env, reply, queue_id, size)
        await self._call(self.hooks.smtp_transaction_done(session, env, reply, queue_id))
        self.reply(reply)

    async def _accept(self, session: Session, env: Envelope,
                      message: Message) -> tuple[Reply, str | None, str | None]:
        """Ask smtp_data, add the trace headers, queue: (reply, queue ID, deciding plugin)."""
        try:
            verdict, plugin = await self.hooks.smtp_data(session, env, message)
        except PluginError as exc:
            return R.PLUGIN_FAILED, None, exc.plugin
        if verdict is not None and not verdict.is_positive:
            return verdict, None, plugin
        runtime = self.state.runtime
        hostname = self.settings.hostname
        queue_id = runtime.store.new_id()
        top = received_header(session, env, hostname, queue_id)
        found = results(env)
        if found:
            top += f"Authentication-Results: {header_value(hostname, found)}\r\n".encode(
                "utf-8", "replace")
        top += b"".join(f"{n}: {v}\r\n".encode("utf-8", "surrogateescape")
                        for n, v in message.added_headers)
        data = top + strip_own(message.data, hostname)
        del message  # the bytes as received: only the queued copy stays in memory
        try:
            item = await self.intake.submit(Submission(
                mail_from=env.mail_from, recipients=env.rcpt_to, data=data,
                envelope=env, auth_user=session.auth_user,
                trusted_network=session.trusted_network, peer=session.peer_host,
                helo=session.helo or "", item_id=queue_id))
        except QueueFull:
            return R.QUEUE_FULL, None, None
        except PluginError as exc:
            return R.PLUGIN_FAILED, None, exc.plugin
        except (QueueError, OSError) as exc:
            log.error("session %s: could not queue the message: %s", session.id, exc)
            return R.QUEUE_WRITE_FAILED, None, None
        return Reply(250, "2.0.0", f"Queued as {item.id}"), item.id, None

    def _log_transaction(self, session: Session, env: Envelope, reply: Reply,
                         queue_id: str | None, size: int) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("session=%s qid=%s from=<%s> to=%s peer=%s tls=%s auth=%s size=%d "
                     "reply=%r", session.id, queue_id or "-", env.mail_from,
                     ",".join(f"<{r}>" for r in env.rcpt_to), session.peer_host,
                     session.tls.version if session.tls else "no", session.auth_user or "-",
                     size, str(reply))

    # ---------------------------------------------------------------- the rest

    async def rset(self, arg: str) -> None:
        if arg.strip():
            return self.reply(Reply(501, "5.5.4", "Syntax: RSET"))
        self.envelope = None
        self.reply(R.OK)

    async def noop(self, arg: str) -> None:
        self.reply(R.OK)

    async def quit(self, arg: str) -> None:
        self.write(b"221 2.0.0 Bye\r\n")
        self.close()
        raise Closed("quit")

    async def vrfy(self, arg: str) -> None:
        if not arg.strip():
            return self.reply(Reply(501, "5.5.4", "Syntax: VRFY <address>"))
        self.reply(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and "
                                       "attempt delivery"))

    async def expn(self, arg: str) -> None:
        self.reply(Reply(502, "5.5.1", "EXPN not available"))

    async def help(self, arg: str) -> None:
        assert self.session is not None
        commands = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP",
                    "QUIT"]
        if self.tls is not None and self.session.tls is None:
            commands.append("STARTTLS")
        if self.session.tls is not None and not self.session.authenticated:
            commands.append("AUTH")
        self.reply(Reply(214, "2.0.0", "Commands: " + " ".join(commands)))


def tls_info(transport: Any) -> TlsInfo:  # noqa: ANN401 - an asyncio or uvloop transport
    sslobj = transport.get_extra_info("ssl_object")
    cipher = transport.get_extra_info("cipher") or ("", "", 0)
    version = sslobj.version() if sslobj is not None else ""
    name = getattr(sslobj, "_tampu_sni", None) if sslobj is not None else None
    return TlsInfo(version=version or "", cipher=cipher[0] or "", server_name=name)
