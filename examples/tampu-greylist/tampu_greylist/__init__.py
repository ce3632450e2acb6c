"""Greylisting for tampu, the example plugin of docs/hooks.md (tested by the main suite).

The first time a (client network, sender, recipient) triplet is seen, the recipient gets a
temporary refusal; a retry after ``delay`` seconds is accepted (and the triplet remembered for
``remember`` seconds). Real MTAs retry, most spam engines do not. Authenticated sessions are
never greylisted. Triplets live in the server's state store (``context.state``): this node's
memory by default (a restart forgets them, which only costs one more delay), or a table every
node shares with ``[server] state_store = "postgres"`` (a retry reaching another node passes).
"""

from __future__ import annotations

import ipaddress
import time

from pydantic import Field

from tampu import (
    Envelope,
    PluginContext,
    PluginSettings,
    Reply,
    Session,
    StateError,
    dry_run_unsafe,
    hookimpl,
)

GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")


class GreylistSettings(PluginSettings):
    priority: int = Field(default=10, description="Before localusers/relay, which accept.")
    delay: float = Field(default=300, ge=0, description="Seconds before a retry is accepted.")
    remember: float = Field(default=36 * 86400, gt=0,
                            description="Seconds a passed triplet stays accepted.")


class Greylist:
    Settings = GreylistSettings

    def __init__(self, ctx: PluginContext[GreylistSettings]) -> None:
        self.settings = ctx.settings
        self.state = ctx.server.state
        self.log = ctx.log

    @staticmethod
    def network(host: str) -> str:
        """Senders retry from other addresses of their pool: key on the /24 (or /64)."""
        addr = ipaddress.ip_address(host)
        prefix = 24 if addr.version == 4 else 64
        return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))

    @hookimpl
    @dry_run_unsafe  # it remembers the triplet
    async def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                           params: dict[str, str | bool]) -> Reply | None:
        if session.authenticated:
            return None
        key = f"{self.network(session.peer_host)} {envelope.mail_from.lower()} {address.lower()}"
        now = time.time()
        try:
            seen = await self.state.get("greylist", key)
            if seen is None:  # first time (or forgotten after `remember`): start the delay
                await self.state.compare_and_set("greylist", key, None, now,
                                                 ttl=self.settings.remember)
                seen = await self.state.get("greylist", key)
        except StateError as exc:  # fail open: greylisting is a filter, not a gate
            self.log.error("greylist: state store unreachable, not greylisting: %s", exc)
            return None
        if not isinstance(seen, int | float) or now - seen < self.settings.delay:
            return GREYLISTED
        return None  # passed: the other plugins decide whether the recipient exists
