"""``localusers``: a recipient in a local domain is accepted only if the user exists.

Users come from the core's user directory (``domains/<domain>/users``, and other sources
such as Dovecot), looked up without the address suffix and drop characters, case-mapped.
``postmaster`` is always accepted (RFC 5321 4.5.1). Other plugins (aliases) may accept more
recipients through the same hook; when nobody accepts, the core answers ``550 5.1.1``.
"""

from __future__ import annotations

from collections.abc import Awaitable

from pydantic import Field

from tampu import Envelope, PluginContext, PluginSettings, Reply, Session, hookimpl
from tampu.addresses import lookup_key, split_address
from tampu.reply import RECIPIENT_OK


class LocalUsersSettings(PluginSettings):
    accept_postmaster: bool = Field(default=True, description="Accept postmaster@ every local "
                                    "domain, as RFC 5321 requires.")


class LocalUsersPlugin:
    Settings = LocalUsersSettings

    def __init__(self, ctx: PluginContext[LocalUsersSettings]) -> None:
        self.ctx = ctx

    @hookimpl
    def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                     params: dict[str, str | bool]) -> Reply | Awaitable[Reply | None] | None:
        server = self.ctx.server
        user, domain = split_address(address)
        if not server.is_local_domain(domain):
            return None
        if self.ctx.settings.accept_postmaster and lookup_key(user) == "postmaster":
            return RECIPIENT_OK
        if server.users.owner(address) is not None:
            return RECIPIENT_OK  # the common case: no coroutine, no await
        if server.users.sources:
            return self._ask_sources(address)
        return None

    async def _ask_sources(self, address: str) -> Reply | None:
        return RECIPIENT_OK if await self.ctx.server.users.exists(address) else None
