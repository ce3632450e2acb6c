"""``spf``: check the sender's SPF policy (RFC 7208) at MAIL FROM, like chasquid.

Only sessions that did not authenticate are checked. The result is recorded in the
transaction's authentication results (:mod:`tampu.authres`: ``spf=pass
smtp.mailfrom=...``), where other plugins read it (security levels trust only ``pass``; the
post-data hook sees ``SPF_PASS``; DMARC checks alignment) and from which the core writes the
``Authentication-Results:`` header; this plugin adds ``Received-SPF:``. What happens for each
result is configurable; by default only ``fail`` is refused, with ``550 5.7.23``.
"""

from __future__ import annotations

import functools
import re
from typing import Literal

from pydantic import Field

from tampu import (
    Envelope,
    Message,
    PluginContext,
    PluginSettings,
    Reply,
    Session,
    StashKey,
    hookimpl,
)
from tampu.authres import MethodResult, add_result
from tampu.plugins.spf.check import Evaluation, SpfChecker, SpfResult

__all__ = ["SpfPlugin", "SpfResult"]

Action = Literal["accept", "reject", "tempfail"]

_EVALUATION: StashKey[Evaluation] = StashKey()
_SIMPLE_ADDR = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+$")


class SpfSettings(PluginSettings):
    priority: int = Field(default=20, description="Order on each hook: lower runs first. Low "
                          "by default so that plugins reading the SPF result at MAIL FROM "
                          "(security levels) run after it.")
    on_fail: Action = Field(default="reject", description="What to do with a message whose "
                            "SPF result is fail: accept, reject (550 5.7.23) or tempfail (451).")
    on_softfail: Action = Field(default="accept", description="Action for softfail.")
    on_neutral: Action = Field(default="accept", description="Action for neutral.")
    on_none: Action = Field(default="accept", description="Action for none (no SPF record).")
    on_temperror: Action = Field(default="accept", description="Action for temperror (DNS "
                                 "failure). chasquid accepts, so that DNS trouble never "
                                 "blocks mail.")
    on_permerror: Action = Field(default="accept", description="Action for permerror (a broken "
                                 "SPF record).")
    timeout: float = Field(default=20.0, gt=0, description="Seconds the whole evaluation may "
                           "take (RFC 7208 suggests at least 20); each DNS query is limited by "
                           "[server] dns_timeout. Keep it below [server] plugin_timeout.")
    check_null_sender: bool = Field(default=True, description="For the null sender <> check "
                                    "the HELO identity (postmaster@HELO), as RFC 7208 2.4 "
                                    "says. chasquid skips the check for <>.")
    add_headers: bool = Field(default=True, description="Add Received-SPF and "
                              "Authentication-Results headers to checked messages.")


class SpfPlugin:
    Settings = SpfSettings

    def __init__(self, ctx: PluginContext[SpfSettings]) -> None:
        self.ctx = ctx
        server = ctx.server.config.server
        self.checker = SpfChecker(list(server.dns_servers), server.dns_timeout,
                                  ctx.settings.timeout, ctx.server.hostname, ctx.server.dns)

    @functools.cached_property
    def actions(self) -> dict[str, Action]:
        """SPF result -> what to do (the ``on_*`` settings; anything else: accept)."""
        settings = self.ctx.settings
        return {name[3:]: getattr(settings, name) for name in type(settings).model_fields
                if name.startswith("on_")}

    def action(self, result: str) -> Action:
        return self.actions.get(result, "accept")

    async def evaluate(self, ip: str, sender: str, helo: str) -> Evaluation:
        """Run one SPF check on the event loop (asynchronous DNS; see check.py)."""
        return await self.checker.check_async(ip, sender, helo)

    @hookimpl
    async def smtp_mail_from(self, session: Session, envelope: Envelope, address: str,
                             params: dict[str, str | bool]) -> Reply | None:
        if session.is_submission:
            return None  # authenticated users are trusted, as in chasquid
        helo = session.helo or ""
        if not address and (not self.ctx.settings.check_null_sender or not helo):
            return None
        evaluation = await self.evaluate(session.peer_host, address, helo)
        res = evaluation.result
        envelope.stash[_EVALUATION] = evaluation
        add_result(envelope, method_result(evaluation))
        action = self.action(res.result)
        self.ctx.log.debug("session=%s SPF %s for <%s> from %s (%s): %s", session.id, res.result,
                           res.identity, session.peer_host, res.explanation, action)
        if action == "accept":
            return None
        status = "7.24" if res.result in ("temperror", "permerror") else "7.23"
        if action == "reject":
            return Reply(550, f"5.{status}", f"SPF check failed: {res.explanation}")
        return Reply(451, f"4.{status}", f"SPF check failed temporarily: {res.explanation}")

    @hookimpl
    def smtp_data(self, session: Session, envelope: Envelope, message: Message) -> Reply | None:
        evaluation = envelope.stash.get(_EVALUATION, None)
        if evaluation is None or session.is_submission or not self.ctx.settings.add_headers:
            return None
        message.add_header("Received-SPF", evaluation.received_spf)
        return None


def method_result(evaluation: Evaluation) -> MethodResult:
    """The RFC 8601 result of one SPF evaluation: ``spf=pass smtp.mailfrom=a@b``."""
    res = evaluation.result
    if evaluation.scope == "helo":
        prop = ("smtp.helo", res.domain)
    elif _SIMPLE_ADDR.match(res.identity):
        prop = ("smtp.mailfrom", res.identity)
    else:
        prop = ("smtp.mailfrom", res.domain)
    return MethodResult("spf", res.result, (prop,), comment=res.explanation)
