"""``delivery_lmtp``: local delivery over LMTP (RFC 2033) to Dovecot or any LMTP server.

Claims recipients in a local domain (limited to ``domains`` when set) that have no ``pipe``
(``delivery_mda``) nor ``via`` (``delivery_smtp``) route. The server is reached over TCP
(``address``) or a UNIX socket (``socket``). The ``deliver`` hook asks about one recipient at a
time, so each delivery is one LMTP session with one ``RCPT TO``: simple, and each recipient
gets its own reply, which is what LMTP is for.

2xx is delivered, 4xx a temporary failure, 5xx a permanent one; the server's code, enhanced
code and text are kept in the result (and so in the queue state and the DSN). A refused or
timed-out connection, or a session that breaks, is a temporary failure.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import Field, field_validator, model_validator

from tampu import (
    DeliveryResult,
    PluginContext,
    PluginSettings,
    QueueItem,
    Recipient,
    hookimpl,
)
from tampu.config import split_hostport
from tampu.placeholders import check_placeholders, expand_placeholders
from tampu.plugins.delivery_lmtp.client import LmtpError, LmtpReply, open_session

PLACEHOLDERS = frozenset({"user", "domain", "address"})
TIMEOUT_SHARE = 0.9
"""Part of ``[server] delivery_timeout`` a session may use, so that tampu ends it, not the core."""


class LmtpSettings(PluginSettings):
    address: str | None = Field(default=None, description="host:port of the LMTP server over "
                                "TCP, e.g. 127.0.0.1:24 ([::1]:24 for IPv6).")
    socket: str | None = Field(default=None, description="Path of the LMTP server's UNIX "
                               "socket, e.g. /run/dovecot/lmtp. Set this or address.")
    recipient: str = Field(
        default="%user%@%domain%",
        description="The RCPT TO address sent to the server. %user% is the normalised user "
        "part (no +tag, lower case), %domain% the domain, %address% the address as queued.",
    )
    timeout: float = Field(default=30.0, gt=0, description="Seconds for the whole session "
                           "(at most 90% of [server] delivery_timeout).")
    domains: list[str] = Field(
        default_factory=list,
        description="Deliver only for these local domains; empty: every local domain.",
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is not None and not split_hostport(value)[0]:
            raise ValueError(f"{value!r} has no host (write 127.0.0.1:24)")
        return value

    @field_validator("recipient")
    @classmethod
    def _check_recipient(cls, value: str) -> str:
        return check_placeholders(value, PLACEHOLDERS)

    @field_validator("domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [d.lower() for d in value]

    @model_validator(mode="after")
    def _one_endpoint(self) -> LmtpSettings:
        if (self.address is None) == (self.socket is None):
            raise ValueError("set exactly one of address (host:port) or socket (a path)")
        return self


def result_of(reply: LmtpReply, remote: str, stage: str) -> DeliveryResult:
    kw = {"code": reply.code, "enhanced": reply.enhanced, "remote": remote}
    if reply.ok:
        return DeliveryResult.sent(reply.text or "delivered", **kw)
    text = reply.text or f"{stage or 'delivery'} refused"  # codes travel apart, as for SMTP
    if reply.code >= 500 and stage not in ("greeting", "LHLO"):  # a server not ready: retry
        return DeliveryResult.permanent(text, **kw)
    return DeliveryResult.temporary(text, **kw)


class LmtpPlugin:
    Settings = LmtpSettings

    def __init__(self, ctx: PluginContext[LmtpSettings]) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.host: str | None = None
        self.port = 0
        if settings.address is not None:
            self.host, self.port = split_hostport(settings.address)
            self.remote = settings.address
        else:
            self.remote = f"unix:{settings.socket}"

    def timeout(self) -> float:
        share = float(self.ctx.server.config.server.delivery_timeout) * TIMEOUT_SHARE
        return min(self.ctx.settings.timeout, share)

    def claims(self, recipient: Recipient) -> bool:
        return self.ctx.server.is_local_mailbox(recipient, self.ctx.settings.domains)

    def lmtp_recipient(self, address: str) -> str:
        user, domain = self.ctx.server.mailbox_of(address)
        values = {"user": user, "domain": domain,
                  "address": address}
        return expand_placeholders(self.ctx.settings.recipient, values)

    @hookimpl
    def delivery_route(self, item: QueueItem, recipient: Recipient) -> str | None:
        if not self.claims(recipient):
            return None
        return f"LMTP {self.remote}, RCPT TO:<{self.lmtp_recipient(recipient.address)}>"

    @hookimpl
    async def deliver(self, item: QueueItem, recipient: Recipient,
                      message: bytes) -> DeliveryResult | None:
        if not self.claims(recipient):
            return None
        rcpt = self.lmtp_recipient(recipient.address)
        timeout = self.timeout()
        try:
            async with asyncio.timeout(timeout):
                result = await self._session(item, rcpt, message)
        except TimeoutError:
            result = DeliveryResult.temporary(f"LMTP session timed out after {timeout:g}s",
                                              remote=self.remote)
        except (OSError, LmtpError) as exc:
            reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else (
                str(exc) or type(exc).__name__)
            result = DeliveryResult.temporary(f"LMTP server {self.remote}: {reason}",
                                              remote=self.remote)
        return result  # the core logs the attempt with its result

    async def _session(self, item: QueueItem, rcpt: str, message: bytes) -> DeliveryResult:
        session = await open_session(host=self.host, port=self.port,
                                     socket_path=self.ctx.settings.socket)
        try:
            outcome = await session.deliver(
                lhlo=self.ctx.server.hostname, mail_from=item.mail_from, recipients=[rcpt],
                message=message, smtputf8=item.smtputf8)
        except BaseException:
            session.abort()
            raise
        await session.close()
        if outcome.session_reply is not None:
            return result_of(outcome.session_reply, self.remote, outcome.stage)
        return result_of(outcome.per_recipient[rcpt], self.remote, outcome.stage)
