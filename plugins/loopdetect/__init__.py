"""``loopdetect``: refuse a message that already carries too many ``Received:`` headers."""

from __future__ import annotations

from pydantic import Field

from tampu import Envelope, Message, PluginContext, PluginSettings, Reply, Session, hookimpl
from tampu.reply import LOOP_DETECTED


class LoopDetectSettings(PluginSettings):
    max_received: int = Field(default=50, gt=0, description="Received headers a message may "
                              "carry before it is refused as a loop (chasquid: 50).")


class LoopDetectPlugin:
    Settings = LoopDetectSettings

    def __init__(self, ctx: PluginContext[LoopDetectSettings]) -> None:
        self.max = ctx.settings.max_received

    @hookimpl
    def smtp_data(self, session: Session, envelope: Envelope, message: Message) -> Reply | None:
        if message.count_header("Received") > self.max:
            return LOOP_DETECTED
        return None
