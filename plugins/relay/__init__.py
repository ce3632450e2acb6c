"""``relay``: recipients in remote domains only for authenticated sessions (no open relay)."""

from __future__ import annotations

from tampu import Envelope, PluginContext, PluginSettings, Reply, Session, hookimpl
from tampu.reply import RECIPIENT_OK, RELAY_DENIED


class RelayPlugin:
    Settings = PluginSettings

    def __init__(self, ctx: PluginContext[PluginSettings]) -> None:
        self.ctx = ctx

    @hookimpl
    def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                     params: dict[str, str | bool]) -> Reply | None:
        if self.ctx.server.is_local_address(address):
            return None  # local recipients are for localusers / aliases to accept
        if session.authenticated:
            return RECIPIENT_OK
        return RELAY_DENIED
