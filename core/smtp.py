"""The SMTP dialogue: an aiosmtpd ``SMTP`` subclass that asks the hooks at every stage.

aiosmtpd does the parsing and the line protocol; this class replaces the parts whose built-in
behaviour is not enough: EHLO (what works), AUTH (over STARTTLS *and* implicit TLS, through
``smtp_auth``), MAIL/RCPT/DATA verdicts through hooks, enhanced status codes on every reply,
a per-session unknown-command budget, and the durable hand-off to the queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import MISSING, syntax

from tampu import reply as R
from tampu.envelope import Envelope, ListenerInfo, Message, Session, TlsInfo
from tampu.errors import PluginError, QueueError, QueueFull
from tampu.received import received_header
from tampu.reply import Reply, with_enhanced_code
from tampu.smtp_auth import AuthMixin
from tampu.smtp_proxy import PROXY_TIMEOUT, IPNetwork, ProxyMixin

if TYPE_CHECKING:
    import ssl

    from tampu.server import ServerState

log = logging.getLogger("tampu.smtp")

# The common address forms, parsed without the email package (slow); anything else (quoted
# local parts, comments, source routes) goes to aiosmtpd's full parser.
_SIMPLE_ADDR = re.compile(r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\x80-\U0010ffff]+@[A-Za-z0-9.\-\[\]:"
                          r"\x80-\U0010ffff]+|)>(?: +(.*))?$")
_IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")


def parse_params(options: list[str]) -> dict[str, str | bool]:
    params: dict[str, str | bool] = {}
    for opt in options:
        name, eq, value = opt.partition("=")
        params[name.upper()] = value if eq else True
    return params


class _Commands(dict[str, Any]):
    """aiosmtpd's command table, answering unknown commands with our own counter."""

    def __init__(self, known: dict[str, Any], unknown: Any) -> None:
        super().__init__(known)
        self.unknown = unknown

    def get(self, key: str, default: Any = None) -> Any:  # noqa: ANN401 - dict API
        found = super().get(key)
        return found if found is not None else self.unknown


_COMMAND_TABLES: dict[type[Any], tuple[tuple[str, str], ...]] = {}


def _command_table(cls: type[Any]) -> tuple[tuple[str, str], ...]:
    """(COMMAND, method name) for every ``smtp_*`` method of ``cls``, computed once."""
    table = _COMMAND_TABLES.get(cls)
    if table is None:
        table = tuple((name[5:], name) for name in dir(cls) if name.startswith("smtp_"))
        _COMMAND_TABLES[cls] = table
    return table


class TampuSMTP(AuthMixin, ProxyMixin):
    """One SMTP connection on one listener."""

    def __init__(self, state: ServerState, listener: ListenerInfo,
                 starttls_context: ssl.SSLContext | None,
                 proxy_trusted: list[IPNetwork] | None = None) -> None:
        # aiosmtpd's SMTP.__init__ introspects the class and handler (inspect.getmembers) on
        # every connection: a sixth of the CPU of a connection. We set the same attributes
        # directly, with the per-class tables computed once (see _aiosmtpd_compat test).
        settings = state.context.config.server
        loop = asyncio.get_running_loop()
        self.line_length_limit = settings.max_line_length + 1  # + the transparent dot
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.__ident__ = "ESMTP tampu"
        self.loop = loop
        self.event_handler = None
        self.data_size_limit = settings.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = settings.hostname
        self.tls_context = starttls_context
        self.require_starttls = False
        self._timeout_duration = settings.idle_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = PROXY_TIMEOUT if proxy_trusted is not None else None
        self.proxy_trusted = proxy_trusted or []
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = listener.kind != "smtp"
        self._auth_methods: dict[str, Any] = {}
        self._ehlo_hook_ver = None
        self._enforce_call_limit = False
        # aiosmtpd keeps this dict on the class and grows it on every EHLO: keep our own.
        self.command_size_limits = collections.defaultdict(lambda: 512, {"MAIL": 512 + 26 + 10})
        # aiosmtpd asks this table which handler hooks exist; ours all go to _call_handler_hook
        self._handle_hooks = {k: self._call_handler_hook for k in ("MAIL", "RCPT", "DATA")}
        if proxy_trusted is not None:
            self._handle_hooks["PROXY"] = self._call_handler_hook
        self._smtp_methods = _Commands(
            {name: getattr(self, attr) for name, attr in _command_table(type(self))},
            self._unknown_command)
        self.state = state
        self.listener = listener
        self.settings = settings
        self._unknown_budget = settings.max_unknown_commands
        self._greeted = False
        self.tsession: Session | None = None
        self.tenvelope = Envelope()
        self.in_data = False

    # ---------------------------------------------------------------- connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.tsession is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername") or ("", 0)
            self.tsession = Session(peer_host=str(peer[0]), peer_port=int(peer[1]),
                                    listener=self.listener)
            self.state.connections.add(self)
            if transport.get_extra_info("ssl_object") is not None:  # implicit TLS
                self.tsession.tls = _tls_info(transport)
        else:
            assert self.tsession is not None
            self.tsession.tls = _tls_info(transport)
            self.tsession.helo = None
            self.tsession.esmtp = False
            self.tenvelope = Envelope()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self in self.state.connections:
            self.state.connections.discard(self)
            if self.state.hooks.has("smtp_disconnect"):
                self.state.spawn(self._disconnected())

    async def _disconnected(self) -> None:
        assert self.tsession is not None
        await self.state.hooks.smtp_disconnect(self.tsession)

    async def _handle_client(self) -> None:
        assert self.tsession is not None
        if self._proxy_timeout is not None:
            # Before smtp_connect, so that plugins see the proxied client; then tell aiosmtpd
            # the handshake is done (it would otherwise wait for a second header).
            if not await self._proxy_handshake():
                self._close()
                return
            self._proxy_timeout = None
        if len(self.state.connections) > self.settings.max_connections:
            await self._reply(R.TOO_MANY_CONNECTIONS)
            self._close()
            return
        if self.state.stopping:
            await self._reply(R.SHUTTING_DOWN)
            self._close()
            return
        try:
            if self.tsession.tls is not None:
                await self.state.hooks.smtp_starttls(self.tsession)
            refusal = await self.state.hooks.smtp_connect(self.tsession)
        except PluginError:
            refusal = Reply(421, "4.3.0", "Local error, try again later")
        if refusal is not None:
            await self._reply(refusal)
            self._close()
            return
        await super()._handle_client()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        # Idle means silent: aiosmtpd restarts its timer only per command, so a DATA upload
        # longer than idle_timeout was cut mid-message. (During PROXY: the proxy's timeout.)
        self._reset_timeout(self._proxy_timeout)
        super().data_received(data)

    def _timeout_cb(self) -> None:
        transport = cast("asyncio.Transport | None", self.transport)  # uvloop's: no subclass
        if transport is not None and not transport.is_closing():
            transport.write(f"{_IDLE_TIMEOUT}\r\n".encode())  # say why, then close
        super()._timeout_cb()

    @property
    def idle(self) -> bool:
        """No transaction in progress: safe to close at shutdown."""
        return not self.in_data and not self.tenvelope.rcpt_to

    async def close_for_shutdown(self) -> None:
        try:
            await self._reply(R.SHUTTING_DOWN)
        except Exception:  # the client may be gone already
            pass
        self._close()

    # ---------------------------------------------------------------- replies

    async def push(self, status: Any) -> None:  # noqa: ANN401 - aiosmtpd's AnyStr API
        if isinstance(status, str):
            if not self._greeted and status.startswith("220 "):
                self._greeted = True
            elif status[:1] in "245":  # every line of a multi-line reply, any code
                status = "\r\n".join(with_enhanced_code(line) for line in status.split("\r\n"))
        await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        log.exception("session %s: internal error: %s",
                      self.tsession.id if self.tsession else "?", error)
        return str(R.PLUGIN_FAILED)

    async def _unknown_command(self, arg: str | None) -> None:
        self._unknown_budget -= 1
        if self._unknown_budget < 1:
            await self._reply(R.TOO_MANY_ERRORS)
            self._close()
            return
        await self._reply(Reply(500, "5.5.1", "Command unrecognized"))

    # ---------------------------------------------------------------- HELO / EHLO

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str | None) -> None:
        await self._helo(hostname, esmtp=False)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str | None) -> None:
        await self._helo(hostname, esmtp=True)

    async def _helo(self, hostname: str | None, *, esmtp: bool) -> None:
        assert self.tsession is not None
        verb = "EHLO" if esmtp else "HELO"
        if not hostname:
            await self._reply(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        self._set_rset_state()
        self.tsession.esmtp = esmtp
        try:
            refusal = await self.state.hooks.smtp_helo(self.tsession, hostname)
            extra = await self.state.hooks.smtp_ehlo_capabilities(self.tsession) if esmtp else []
        except PluginError:
            await self._reply(R.PLUGIN_FAILED)
            return
        if refusal is not None and not refusal.is_positive:
            await self._reply(refusal)
            return
        assert self.session is not None
        self.session.host_name = hostname
        self.session.extended_smtp = esmtp
        self.tsession.helo = hostname
        if not esmtp:  # RFC 2034 3: no enhanced code in the reply to HELO/EHLO
            await super().push(f"250 {self.hostname}")
            return
        caps = [self.hostname, "PIPELINING", f"SIZE {self.data_size_limit}", "8BITMIME",
                "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.tls_context is not None and self.tsession.tls is None:
            caps.append("STARTTLS")
        if self.tsession.tls is not None and not self.tsession.authenticated:
            caps.append("AUTH PLAIN LOGIN")
        caps.extend(kw for kw in extra if kw not in caps)
        lines = [f"250-{c}" for c in caps[:-1]] + [f"250 {caps[-1]}"]
        self._greeted = True
        await super().push("\r\n".join(lines))

    # ---------------------------------------------------------------- STARTTLS / AUTH

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        assert self.tsession is not None
        if self.tsession.tls is not None:
            await self._reply(Reply(503, "5.5.1", "TLS already active"))
            return
        await super().smtp_STARTTLS(arg)
        session: Session = self.tsession  # connection_made set .tls during the handshake
        if session.tls is not None:
            try:
                await self.state.hooks.smtp_starttls(session)
            except PluginError:
                pass

    # ---------------------------------------------------------------- transaction

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_ADDR.match(arg)
        if m is not None:
            return m.group(1) or "<>", m.group(2) or ""
        return super()._getaddr(arg)

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()
        self.tenvelope = Envelope()

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:  # noqa: ANN401
        if command == "PROXY" and "PROXY" in self._handle_hooks:
            return self._proxy(args[0])
        if command == "MAIL":
            return await self._mail(args[0], args[1])
        if command == "RCPT":
            return await self._rcpt(args[0], args[1])
        if command == "DATA":
            return await self._data()
        return MISSING

    async def _mail(self, address: str, options: list[str]) -> str:
        assert self.tsession is not None
        if address == "<>":
            address = ""
        queue = self.state.context.queue
        if queue is not None and queue.full():  # early, so no body is sent for nothing
            return str(R.QUEUE_FULL)
        params = parse_params(options)
        env = Envelope(mail_from=address, mail_params=params,
                       smtputf8=bool(params.get("SMTPUTF8")))
        try:
            verdict = await self.state.hooks.smtp_mail_from(self.tsession, env, address, params)
        except PluginError:
            return str(R.PLUGIN_FAILED)
        if verdict is not None and not verdict.is_positive:
            return str(verdict)
        self.tenvelope = env
        assert self.envelope is not None
        self.envelope.mail_from = address or "<>"
        self.envelope.mail_options.extend(options)
        return str(verdict or R.SENDER_OK)

    async def _rcpt(self, address: str, options: list[str]) -> str:
        assert self.tsession is not None
        if address in ("", "<>"):  # the null path is a sender, never a recipient
            return str(Reply(501, "5.1.3", "Bad recipient address syntax"))
        if len(self.tenvelope.rcpt_to) >= self.settings.max_recipients:
            return str(R.TOO_MANY_RECIPIENTS)
        params = parse_params(options)
        try:
            verdict = await self.state.hooks.smtp_rcpt_to(self.tsession, self.tenvelope,
                                                          address, params)
        except PluginError:
            return str(R.PLUGIN_FAILED)
        if verdict is None:
            verdict = R.UNKNOWN_RECIPIENT  # fail closed: nobody accepted it
        if verdict.is_positive:
            self.tenvelope.rcpt_to.append(address)
            assert self.envelope is not None
            self.envelope.rcpt_tos.append(address)
        return str(verdict)

    async def _data(self) -> str:
        assert self.tsession is not None
        session, env = self.tsession, self.tenvelope
        assert self.envelope is not None and self.envelope.original_content is not None
        message = Message(bytes(self.envelope.original_content))
        queue_id: str | None = None
        self.in_data = True
        try:
            reply = await self._accept(session, env, message)
            if reply.is_positive:
                queue_id = reply.text.rpartition(" ")[2]
        finally:
            self.in_data = False
        log.info("session=%s qid=%s from=<%s> to=%s peer=%s helo=%s tls=%s auth=%s size=%d "
                 "reply=%r", session.id, queue_id or "-", env.mail_from,
                 ",".join(f"<{r}>" for r in env.rcpt_to), session.peer_host,
                 session.helo, session.tls.version if session.tls else "no",
                 session.auth_user or "-", len(message.data), str(reply))
        try:
            await self.state.hooks.smtp_transaction_done(session, env, reply, queue_id)
        except PluginError:
            pass
        return str(reply)

    async def _accept(self, session: Session, env: Envelope, message: Message) -> Reply:
        try:
            verdict = await self.state.hooks.smtp_data(session, env, message)
        except PluginError:
            return R.PLUGIN_FAILED
        if verdict is not None and not verdict.is_positive:
            return verdict
        queue = self.state.context.queue
        assert queue is not None
        headers = [*message.added_headers]
        data = b"".join(
            f"{name}: {value}\r\n".encode() for name, value in headers
        )
        queue_id = queue.new_id()
        data = received_header(session, env, self.hostname, queue_id) + data + message.data
        try:
            item = await queue.submit(
                item_id=queue_id, mail_from=env.mail_from, recipients=env.rcpt_to, data=data,
                envelope=env,
                auth_user=session.auth_user, peer=session.peer_host, helo=session.helo or "",
            )
        except QueueFull:
            return R.QUEUE_FULL
        except PluginError:
            return R.PLUGIN_FAILED
        except (QueueError, OSError) as exc:
            log.error("session %s: could not queue message: %s", session.id, exc)
            return R.QUEUE_WRITE_FAILED
        return Reply(250, "2.0.0", f"Queued as {item.id}")


def _tls_info(transport: asyncio.BaseTransport) -> TlsInfo:
    sslobj = transport.get_extra_info("ssl_object")
    cipher = transport.get_extra_info("cipher") or ("", "", 0)
    version = sslobj.version() if sslobj is not None else ""
    name = getattr(sslobj, "_tampu_sni", None) if sslobj is not None else None
    return TlsInfo(version=version or "", cipher=cipher[0] or "", server_name=name)

