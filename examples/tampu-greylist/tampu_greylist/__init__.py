"""Greylisting for tampu, the example plugin of docs/hooks.md (tested by the main suite).

The first time a (client network, sender, recipient) triplet is seen, the recipient gets a
temporary refusal; a retry after ``delay`` seconds is accepted (and the triplet remembered for
``remember`` seconds). Real MTAs retry, most spam engines do not. Authenticated sessions are
never greylisted. State is in memory: a restart forgets it, which only costs one more delay.
"""

from __future__ import annotations

import ipaddress
import time

from pydantic import Field

from tampu import Envelope, PluginContext, PluginSettings, Reply, Session, hookimpl

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
        self.first_seen: dict[tuple[str, str, str], float] = {}

    @staticmethod
    def network(host: str) -> str:
        """Senders retry from other addresses of their pool: key on the /24 (or /64)."""
        addr = ipaddress.ip_address(host)
        prefix = 24 if addr.version == 4 else 64
        return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))

    @hookimpl
    def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                     params: dict[str, str | bool]) -> Reply | None:
        if session.authenticated:
            return None
        key = (self.network(session.peer_host), envelope.mail_from.lower(), address.lower())
        now = time.monotonic()
        seen = self.first_seen.setdefault(key, now)
        if now - seen > self.settings.remember:
            self.first_seen[key] = seen = now
        if now - seen < self.settings.delay:
            return GREYLISTED
        return None  # passed: the other plugins decide whether the recipient exists
