"""The SMTP dialogue (RFC 5321, 3207, 4954, 6531, 3461, 2920, 2034): the commands of one
connection (:class:`tampu.smtp_connection.SmtpConnection` runs the connection itself).

The session asks the hooks at every stage, tells observers what was decided
(``smtp_verdict``), and hands accepted messages to the intake, which returns the queue ID
for the ``250``. Every reply carries an enhanced status code (RFC 2034) except the greeting
and the answers to HELO/EHLO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from tampu import reply as R
from tampu.addresses import PathError, is_literal, parse_path, split_address
from tampu.authres import strip_own
from tampu.envelope import Envelope, Message, Session
from tampu.errors import PluginError, QueueError, QueueFull
from tampu.intake import Submission
from tampu.received import trace_headers
from tampu.reply import Reply
from tampu.smtp_auth import authenticate
from tampu.smtp_connection import SmtpConnection
from tampu.smtp_memory import TRIM_AFTER, give_memory_back
from tampu.smtp_params import check_mail_params, check_rcpt_params, extensions, help_commands
from tampu.smtp_wire import Closed
from tampu.store import ON_DURABLE, Durable

log = logging.getLogger("tampu.smtp")

NO_MEMORY = Reply(452, "4.3.1", "Insufficient system storage for the message now, try again "
                                "later")


class SmtpSession(SmtpConnection):
    """The SMTP dialogue of one connection: the commands."""

    replied_early = False
    """The store said the message is durable and its ``250`` went then (:data:`ON_DURABLE`),
    before the hooks that follow the queueing ran."""

    def command_table(self) -> dict[bytes, Callable[[str], Awaitable[None]]]:
        return {
            b"HELO": self.helo, b"EHLO": self.ehlo, b"MAIL": self.mail, b"RCPT": self.rcpt,
            b"DATA": self.data, b"RSET": self.rset, b"NOOP": self.noop, b"QUIT": self.quit,
            b"VRFY": self.vrfy, b"EXPN": self.expn, b"HELP": self.help,
            b"STARTTLS": self.starttls, b"AUTH": self.auth,
        }

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
        caps = [name, *extensions(session, self.settings.max_message_size,
                                  self.offers_starttls)]
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
        if self.needs_auth and not session.authenticated:
            return self.reply(R.AUTH_REQUIRED)
        if arg[:5].upper() != "FROM:":
            return self.reply(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        start = time.perf_counter()
        try:
            path = parse_path(arg[5:], sender=True)
            check_mail_params(path.params, self.settings.max_message_size)
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

    async def rcpt(self, arg: str) -> None:
        assert self.session is not None
        session, env = self.session, self.envelope
        if self.needs_auth and not session.authenticated:
            return self.reply(R.AUTH_REQUIRED)
        if env is None:
            return self.reply(Reply(503, "5.5.1", "Need MAIL before RCPT"))
        if arg[:3].upper() != "TO:":
            return self.reply(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        start = time.perf_counter()
        try:
            path = parse_path(arg[3:], sender=False, postmaster_domain=self.postmaster_domain(),
                              smtputf8=env.smtputf8)
            check_rcpt_params(path.params)
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

    async def data(self, arg: str) -> None:
        assert self.session is not None
        session, env = self.session, self.envelope
        if arg.strip():
            return self.reply(Reply(501, "5.5.4", "Syntax: DATA"))
        if self.needs_auth and not session.authenticated:
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
        if self.replied_early:
            self.replied_early = False
        else:
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
        data = trace_headers(session, env, message, hostname, queue_id) + strip_own(
            message.data, hostname)
        del message  # the bytes as received: only the queued copy stays in memory
        queued = Reply(250, "2.0.0", f"Queued as {queue_id}")
        reply_bytes = self.encode(queued)

        def durable(sent: int) -> None:  # the store's ON_DURABLE: the 250 goes now
            if self.replied_early:
                return
            self.replied_early = True
            if sent < 0:  # the syncer died: whether the client has its 250 is unknown
                log.warning("session %s: qid=%s is queued; closing the connection, since "
                            "its 250 may or may not have been sent", session.id, queue_id)
                self.abort()
            elif sent < len(reply_bytes):
                self.write(reply_bytes[sent:])
                self.flush()

        self.replied_early = False
        notice = Durable(queue_id, durable, reply_bytes, self.socket_for_syncer)
        token = ON_DURABLE.set(notice)
        try:
            await self.intake.submit(Submission(
                mail_from=env.mail_from, recipients=env.rcpt_to, data=data,
                envelope=env, auth_user=session.auth_user,
                trusted_network=session.trusted_network, peer=session.peer_host,
                helo=session.helo or "", item_id=queue_id,
                origin="local" if session.local_user is not None else "smtp"))
        except (QueueFull, PluginError, QueueError, OSError) as exc:
            if self.replied_early:  # durable and acknowledged: what failed after is logged
                log.error("session %s: qid=%s is queued, but then: %s", session.id,
                          queue_id, exc)
                return queued, queue_id, None
            if isinstance(exc, QueueFull):
                return R.QUEUE_FULL, None, None
            if isinstance(exc, PluginError):
                return R.PLUGIN_FAILED, None, exc.plugin
            log.error("session %s: could not queue the message: %s", session.id, exc)
            return R.QUEUE_WRITE_FAILED, None, None
        finally:
            ON_DURABLE.reset(token)
            notice.socket = None  # a later sync must not write on this session
        return queued, queue_id, None

    def _log_transaction(self, session: Session, env: Envelope, reply: Reply,
                         queue_id: str | None, size: int) -> None:
        if log.isEnabledFor(logging.INFO):
            who = session.auth_user or (f"local:{session.local_user}" if session.local_user
                                        else "-")
            log.info("session=%s qid=%s from=<%s> to=%s peer=%s tls=%s auth=%s size=%d "
                     "reply=%r", session.id, queue_id or "-", env.mail_from,
                     ",".join(f"<{r}>" for r in env.rcpt_to), session.peer_host,
                     session.tls.version if session.tls else "no", who, size, str(reply))

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
        commands = help_commands(self.session, self.offers_starttls)
        self.reply(Reply(214, "2.0.0", "Commands: " + " ".join(commands)))
