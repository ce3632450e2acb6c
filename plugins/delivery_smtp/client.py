"""One SMTP client session to one address: EHLO, opportunistic STARTTLS, MAIL, RCPT, DATA.

TLS is tried the way chasquid does it: first with certificate verification (level
``tls_verified``); if the certificate does not verify, again on a new connection without
verification (``tls_unverified``); if TLS cannot be set up at all, again in plain text
(``plain``). The level reached is then checked (``check_level``) before any mail is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPResponse

from tampu import DeliveryResult
from tampu.plugins.delivery_smtp.mx import Target
from tampu.plugins.domaininfo.store import SecLevel

LevelCheck = Callable[[SecLevel], Awaitable[bool]]
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)(.*)$", re.S)
_QUIT_TIMEOUT = 2.0


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
    rcpt: str
    message: bytes
    smtputf8: bool


class NextHost(Exception):
    """This address or host did not take the mail (temporarily): try the next one."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.text)
        self.result = result


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


def _temporary(text: str, remote: str, enhanced: str = "4.4.1") -> NextHost:
    return NextHost(DeliveryResult.temporary(text, enhanced=enhanced, remote=remote))


class Attempt:
    """Delivery of one job to one address of one target host."""

    def __init__(self, cfg: ClientConfig, target: Target, address: str) -> None:
        self.cfg = cfg
        self.target = target
        self.address = address
        self.remote = f"{target.host} [{address}]" if target.host != address else address
        self.level = SecLevel.PLAIN

    # ------------------------------------------------------------------ connecting

    async def _connect(self) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname=self.address, port=self.target.port,
                               local_hostname=self.cfg.helo, timeout=self.cfg.command_timeout,
                               start_tls=False)
        try:
            await smtp.connect(timeout=self.cfg.connect_timeout)
        except aiosmtplib.SMTPResponseException as exc:  # greeting other than 220
            raise _temporary(f"greeting refused: {exc.code} {exc.message}", self.remote) \
                from None
        except (OSError, aiosmtplib.SMTPException) as exc:
            raise _temporary(f"cannot connect: {exc}", self.remote, "4.4.1") from None
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

    # ------------------------------------------------------------------ the transaction

    async def deliver(self, job: Job, check_level: LevelCheck | None) -> DeliveryResult:
        """Deliver ``job``. Returns ``sent`` or a permanent failure; raises NextHost else."""
        smtp = await self.open()
        try:
            if check_level is not None and not await check_level(self.level):
                raise NextHost(DeliveryResult.temporary(
                    f"security level downgrade: {self.target.host} offered only "
                    f"{self.level.label}, less than before", enhanced="4.7.5",
                    remote=self.remote))
            return await self._transaction(smtp, job)
        except (OSError, aiosmtplib.SMTPException) as exc:
            raise _temporary(f"connection failed during the transaction: {exc}",
                             self.remote) from None
        finally:
            await _quit(smtp)

    async def _transaction(self, smtp: aiosmtplib.SMTP, job: Job) -> DeliveryResult:
        utf8 = smtp.supports_extension("smtputf8")
        if not (job.mail_from.isascii() and job.rcpt.isascii()) and not utf8:
            return DeliveryResult.permanent(
                "the remote server does not support SMTPUTF8, needed for these addresses",
                enhanced="5.6.7", remote=self.remote)
        opts: list[bytes] = []
        if job.smtputf8 and utf8:
            opts.append(b"SMTPUTF8")
        if not job.message.isascii() and smtp.supports_extension("8bitmime"):
            opts.append(b"BODY=8BITMIME")
        if smtp.supports_extension("size"):
            opts.append(f"SIZE={len(job.message)}".encode())
        resp = await smtp.execute_command(b"MAIL", b"FROM:<" + job.mail_from.encode() + b">",
                                          *opts)
        self._check(resp, (250,), "MAIL FROM")
        resp = await smtp.execute_command(b"RCPT", b"TO:<" + job.rcpt.encode() + b">")
        self._check(resp, (250, 251), "RCPT TO")
        try:
            resp = await smtp.data(job.message, timeout=self.cfg.data_timeout)
        except aiosmtplib.SMTPDataError as exc:
            self._check(SMTPResponse(exc.code, exc.message), (), "DATA")  # always raises
            raise
        return DeliveryResult.sent(" ".join(resp.message.split()) or "accepted",
                                   code=resp.code, remote=self.remote)

    def _check(self, resp: SMTPResponse, good: tuple[int, ...], stage: str) -> None:
        if resp.code in good:
            return
        result = reply_result(resp.code, resp.message, self.remote, stage=stage)
        if result.status == "permanent":
            raise _Permanent(result)
        raise NextHost(result)


class _Permanent(Exception):
    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.text)
        self.result = result


async def deliver_to(cfg: ClientConfig, target: Target, address: str, job: Job,
                     check_level: LevelCheck | None) -> DeliveryResult:
    """Deliver through one address: ``sent`` or permanent, else raise NextHost."""
    attempt = Attempt(cfg, target, address)
    try:
        return await attempt.deliver(job, check_level)
    except _Permanent as exc:
        return exc.result


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """Say QUIT politely, unless the attempt is being cancelled (out of time): then just close."""
    task = asyncio.current_task()
    if smtp.is_connected and not (task is not None and task.cancelling()):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(smtp.quit(), _QUIT_TIMEOUT)
    smtp.close()
