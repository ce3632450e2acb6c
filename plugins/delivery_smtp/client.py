"""SMTP client sessions to one address: EHLO, opportunistic STARTTLS, MAIL, RCPT..., DATA.

One transaction carries a :class:`Job`: one sender, one or more recipients (each gets its own
result: a 5xx to its RCPT fails it for good, a 4xx leaves it for the next host, the reply to
DATA is every accepted recipient's). With a :class:`~.pool.ConnectionPool` the connection
comes from the pool when an idle one to the same address fits (RSET first), and goes back to
it after a clean transaction; the pool's limits decide when a new connection may open.

TLS is tried the way chasquid does it: first with certificate verification (level
``tls_verified``); if the certificate does not verify, again on a new connection without
verification (``tls_unverified``); if TLS cannot be set up at all, again in plain text
(``plain``). The level reached is then checked (``check_level``) before any mail is sent.

A ``TlsRequirement`` (``tls_policy.py``: DANE, MTA-STS enforce, a smarthost) replaces that
ladder: TLS as required or nothing, no fallback. A ``login`` step (a smarthost's AUTH) runs
before MAIL FROM.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiosmtplib

from tampu import DeliveryResult
from tampu.plugins.delivery_smtp.mx import Target
from tampu.plugins.delivery_smtp.pool import ConnectionPool, DestinationFailed, Session
from tampu.plugins.domaininfo.store import SecLevel

if TYPE_CHECKING:
    from tampu.plugins.delivery_smtp.tls_policy import TlsRequirement

LevelCheck = Callable[[SecLevel], Awaitable[bool]]
Login = Callable[[aiosmtplib.SMTP, str], Awaitable[None]]
"""``login(smtp, remote)``: authenticate on the open connection; raises NextHost."""
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)(.*)$", re.S)
_QUIT_TIMEOUT = 2.0
_RSET_TIMEOUT = 20.0
"""At most, for the RSET that checks a pooled connection (Postfix: smtp_rset_timeout)."""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    helo: str
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    verified_tls: ssl.SSLContext
    unverified_tls: ssl.SSLContext


@dataclass(frozen=True, slots=True)
class Job:
    """What to send in one transaction."""

    mail_from: str
    rcpts: tuple[str, ...]
    message: bytes
    smtputf8: bool

    def only(self, indexes: list[int]) -> Job:
        """The same message for some of the recipients."""
        return Job(self.mail_from, tuple(self.rcpts[i] for i in indexes), self.message,
                   self.smtputf8)


class NextHost(Exception):
    """This address or host did not take the mail (temporarily): try the next one.
    ``connect``: the connection itself failed (refused, timed out, greeting refused)."""

    def __init__(self, result: DeliveryResult, *, connect: bool = False) -> None:
        super().__init__(result.text)
        self.result = result
        self.connect = connect


def reply_result(code: int, message: str, remote: str, *, stage: str) -> DeliveryResult:
    """A DeliveryResult carrying the remote's reply (code, enhanced code, text)."""
    text = " ".join(message.split())
    enhanced = ""
    match = _ENHANCED.match(text)
    if match:
        enhanced, text = match.group(1), match.group(2)
    text = text or f"{stage} refused"
    if code >= 500:
        return DeliveryResult.permanent(text, code=code, enhanced=enhanced, remote=remote)
    return DeliveryResult.temporary(text, code=code, enhanced=enhanced, remote=remote)


def _temporary(text: str, remote: str, enhanced: str = "4.4.1", *,
               connect: bool = False) -> NextHost:
    return NextHost(DeliveryResult.temporary(text, enhanced=enhanced, remote=remote),
                    connect=connect)


class Attempt:
    """Delivery of one job to one address of one target host."""

    def __init__(self, cfg: ClientConfig, target: Target, address: str,
                 require: TlsRequirement | None = None, login: Login | None = None,
                 pool: ConnectionPool | None = None, login_id: str = "") -> None:
        self.cfg = cfg
        self.target = target
        self.address = address
        self.require = require
        self.login = login
        self.pool = pool
        self.login_id = login_id
        self.remote = f"{target.host} [{address}]" if target.host != address else address
        self.level = SecLevel.PLAIN

    def pool_key(self) -> Hashable:
        """What a pooled connection must have been opened with to serve this attempt: the
        host name (TLS verification), the TLS requirement, the credentials, the EHLO name."""
        req = self.require
        need = None if req is None else (req.reason, req.level, req.implicit, id(req.context))
        return (self.target.host, need, self.login_id, self.cfg.helo,
                id(self.cfg.verified_tls))

    # ------------------------------------------------------------------ connecting

    async def _connect(self) -> aiosmtplib.SMTP:
        implicit = self.require if self.require is not None and self.require.implicit else None
        prefix = f"{implicit.reason}: " if implicit is not None else ""
        sock: socket.socket | None = None
        try:
            if implicit is None:
                smtp = aiosmtplib.SMTP(hostname=self.address, port=self.target.port,
                                       local_hostname=self.cfg.helo,
                                       timeout=self.cfg.command_timeout, start_tls=False)
            else:  # TLS at once, verified for the host's name, to the address looked up
                sock = await _open_socket(self.address, self.target.port,
                                          self.cfg.connect_timeout)
                smtp = aiosmtplib.SMTP(sock=sock, hostname=self.target.host, use_tls=True,
                                       tls_context=implicit.context,
                                       local_hostname=self.cfg.helo,
                                       timeout=self.cfg.command_timeout)
            await smtp.connect(timeout=self.cfg.connect_timeout)
        except aiosmtplib.SMTPResponseException as exc:  # greeting other than 220
            if sock is not None:
                sock.close()
            raise _temporary(f"greeting refused: {exc.code} {exc.message}", self.remote,
                             connect=True) from None
        except (OSError, aiosmtplib.SMTPException) as exc:
            if sock is not None:
                sock.close()  # a failed handshake may leave it open
            raise _temporary(f"{prefix}cannot connect: {exc}", self.remote, "4.4.1",
                             connect=implicit is None) from None
        await self._ehlo(smtp)
        return smtp

    async def _ehlo(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPHeloError:
                await smtp.helo()
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _temporary(f"HELO refused: {exc.code} {exc.message}", self.remote) from None
        except (OSError, aiosmtplib.SMTPException) as exc:
            smtp.close()
            raise _temporary(f"connection lost at EHLO: {exc}", self.remote) from None

    async def _starttls(self, smtp: aiosmtplib.SMTP, ctx: ssl.SSLContext) -> bool:
        """STARTTLS with ``ctx``. False: refused by the server (the connection stays plain)."""
        try:
            await smtp.starttls(server_hostname=self.target.host, tls_context=ctx)
        except aiosmtplib.SMTPResponseException:
            return False
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            smtp.close()
            raise _temporary(f"connection lost at STARTTLS: {exc}", self.remote) from None
        await self._ehlo(smtp)
        return True

    async def open(self) -> aiosmtplib.SMTP:
        """Connect at the best security level this host allows; ``self.level`` tells which."""
        if self.require is not None:
            return await self._open_required(self.require)
        smtp = await self._connect()
        if not smtp.supports_extension("starttls"):
            return smtp
        try:
            if await self._starttls(smtp, self.cfg.verified_tls):
                self.level = SecLevel.TLS_VERIFIED
            return smtp
        except ssl.SSLCertVerificationError:
            smtp.close()
            unverified = True
        except ssl.SSLError:
            smtp.close()
            unverified = False
        if unverified:
            smtp = await self._connect()
            try:
                if smtp.supports_extension("starttls") and \
                        await self._starttls(smtp, self.cfg.unverified_tls):
                    self.level = SecLevel.TLS_UNVERIFIED
                return smtp
            except ssl.SSLError:
                smtp.close()
        return await self._connect()  # TLS is broken with this host: plain text, like chasquid

    async def _open_required(self, req: TlsRequirement) -> aiosmtplib.SMTP:
        """Connect with the TLS ``req`` asks for, or raise NextHost: no fallback."""
        host = self.target.host
        smtp = await self._connect()
        if not req.implicit:
            if not smtp.supports_extension("starttls"):
                smtp.close()
                raise _temporary(f"{req.reason}, but {host} does not offer STARTTLS",
                                 self.remote, "4.7.5")
            try:
                started = await self._starttls(smtp, req.context)
            except OSError as exc:  # ssl.SSLError: handshake or certificate
                smtp.close()
                raise _temporary(f"{req.reason}: TLS with {host} failed: {exc}", self.remote,
                                 "4.7.5") from None
            if not started:
                smtp.close()
                raise _temporary(f"{req.reason}, but {host} refused STARTTLS", self.remote,
                                 "4.7.5")
        if req.verify is not None:
            problem = req.verify(smtp.get_transport_info("ssl_object"))
            if problem is not None:
                await _quit(smtp)
                raise _temporary(f"{req.reason}: {problem}", self.remote, "4.7.5")
        self.level = req.level
        return smtp

    # ------------------------------------------------------------------ the transaction

    async def deliver(self, job: Job, check_level: LevelCheck | None) -> list[DeliveryResult]:
        """Deliver ``job``: one result per recipient (a temporary one: try it at the next
        host). Raises NextHost when nothing could be done here."""
        if self.pool is None:
            own = Session(await self.open(), self.level, self.remote)
            try:
                return (await self._use(own, job, check_level, fresh=True))[0]
            finally:
                await _quit(own.smtp)
        dest, key = (self.address, self.target.port), self.pool_key()
        try:
            found = await self.pool.lease(dest, key)
        except DestinationFailed as exc:
            raise NextHost(exc.result) from None
        session: Session | None = found
        reusable = False
        try:
            if session is not None and not await self._reset(session):
                session = None
            fresh = session is None
            if session is None:
                try:
                    session = Session(await self.open(), self.level, self.remote)
                except NextHost as exc:
                    if exc.connect:
                        self.pool.failed(dest, exc.result)
                    raise
            results, reusable = await self._use(session, job, check_level, fresh=fresh)
            return results
        finally:
            self.pool.give_back(dest, key, session, reusable=reusable)

    async def _reset(self, session: Session) -> bool:
        """Whether a pooled connection still works (RSET answered 250); else it is closed."""
        smtp = session.smtp
        if smtp.is_connected:
            try:
                await smtp.rset(timeout=min(self.cfg.command_timeout, _RSET_TIMEOUT))
                return True
            except (OSError, aiosmtplib.SMTPException):
                pass
        smtp.close()
        return False

    async def _use(self, session: Session, job: Job, check_level: LevelCheck | None, *,
                   fresh: bool) -> tuple[list[DeliveryResult], bool]:
        """The job's transaction on ``session``; the results and whether the connection is
        fit for another transaction. Raises NextHost."""
        smtp = session.smtp
        self.level = session.level
        self.remote = session.remote
        try:
            if check_level is not None and not await check_level(self.level):
                raise NextHost(DeliveryResult.temporary(
                    f"security level downgrade: {self.target.host} offered only "
                    f"{self.level.label}, less than before", enhanced="4.7.5",
                    remote=self.remote))
            if fresh and self.login is not None:
                await self.login(smtp, self.remote)
        except (OSError, aiosmtplib.SMTPException) as exc:
            raise _temporary(f"connection failed during the transaction: {exc}",
                             self.remote) from None
        results, clean = await self._transaction(smtp, job)
        session.messages += 1
        return results, clean and smtp.is_connected

    async def _transaction(self, smtp: aiosmtplib.SMTP,
                           job: Job) -> tuple[list[DeliveryResult], bool]:
        """MAIL, RCPT per recipient, DATA if any was accepted. The results, and whether the
        dialogue ended where another transaction may start."""
        count = len(job.rcpts)
        results: list[DeliveryResult | None] = [None] * count
        utf8 = smtp.supports_extension("smtputf8")
        if not utf8:
            for i, rcpt in enumerate(job.rcpts):
                if not (job.mail_from.isascii() and rcpt.isascii()):
                    results[i] = DeliveryResult.permanent(
                        "the remote server does not support SMTPUTF8, needed for these "
                        "addresses", enhanced="5.6.7", remote=self.remote)
        todo = [i for i in range(count) if results[i] is None]
        if not todo:
            return _filled(results), True
        try:
            opts: list[bytes] = []
            if job.smtputf8 and utf8:
                opts.append(b"SMTPUTF8")
            if not job.message.isascii() and smtp.supports_extension("8bitmime"):
                opts.append(b"BODY=8BITMIME")
            if smtp.supports_extension("size"):
                opts.append(f"SIZE={len(job.message)}".encode())
            resp = await smtp.execute_command(
                b"MAIL", b"FROM:<" + job.mail_from.encode() + b">", *opts)
            if resp.code != 250:
                refused = reply_result(resp.code, resp.message, self.remote,
                                       stage="MAIL FROM")
                return _filled(results, refused), True
            accepted = []
            for i in todo:
                resp = await smtp.execute_command(
                    b"RCPT", b"TO:<" + job.rcpts[i].encode() + b">")
                if resp.code in (250, 251):
                    accepted.append(i)
                else:
                    results[i] = reply_result(resp.code, resp.message, self.remote,
                                              stage="RCPT TO")
            if not accepted:
                return _filled(results), True
            try:
                resp = await smtp.data(job.message, timeout=self.cfg.data_timeout)
            except aiosmtplib.SMTPDataError as exc:
                refused = reply_result(exc.code, exc.message, self.remote, stage="DATA")
                return _filled(results, refused), True
            sent = DeliveryResult.sent(" ".join(resp.message.split()) or "accepted",
                                       code=resp.code, remote=self.remote)
            return _filled(results, sent), True
        except (OSError, aiosmtplib.SMTPException) as exc:
            lost = DeliveryResult.temporary(f"connection failed during the transaction: {exc}",
                                            enhanced="4.4.1", remote=self.remote)
            return _filled(results, lost), False


def _filled(results: list[DeliveryResult | None],
            rest: DeliveryResult | None = None) -> list[DeliveryResult]:
    """``results`` with the recipients still without one given ``rest``."""
    out = []
    for result in results:
        chosen = result if result is not None else rest
        assert chosen is not None
        out.append(chosen)
    return out


async def deliver_to(cfg: ClientConfig, target: Target, address: str, job: Job,
                     check_level: LevelCheck | None, require: TlsRequirement | None = None,
                     login: Login | None = None, *, pool: ConnectionPool | None = None,
                     login_id: str = "") -> list[DeliveryResult]:
    """Deliver through one address: one result per recipient of ``job`` (temporary ones may
    be tried at the next address); raises NextHost when the address took nothing."""
    attempt = Attempt(cfg, target, address, require, login, pool, login_id)
    return await attempt.deliver(job, check_level)


async def _open_socket(address: str, port: int, limit: float) -> socket.socket:
    """A TCP connection to ``address`` (for implicit TLS, which aiosmtplib would otherwise
    verify against the address instead of the host name). Raises OSError."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(limit):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """Say QUIT politely, unless the attempt is being cancelled (out of time): then just close."""
    task = asyncio.current_task()
    if smtp.is_connected and not (task is not None and task.cancelling()):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(smtp.quit(), _QUIT_TIMEOUT)
    smtp.close()
