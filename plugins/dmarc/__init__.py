"""``dmarc``: evaluate the RFC5322.From domain's DMARC policy (RFC 7489) at end of DATA.

Only sessions that did not authenticate are checked. The plugin reads what SPF and DKIM
recorded in :mod:`tampu.authres` (so it runs after them: priority 150), looks up
``_dmarc.<From domain>`` (or of its organizational domain, by the Public Suffix List), checks
alignment, and then, as the operator's settings say: refuses the message (``550 5.7.1``),
accepts it with a mark header (``X-Tampu-DMARC: quarantine``) or only records the result
(``dmarc=fail (p=reject dis=quarantine) header.from=example.com``).
"""

from __future__ import annotations

import logging
import random
from typing import Literal

from pydantic import Field, field_validator

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
from tampu.authres import MethodResult, add_result, results
from tampu.envelope import valid_header_name
from tampu.plugins.dmarc import orgdomain
from tampu.plugins.dmarc.evaluate import (
    Actions,
    Decision,
    Identifiers,
    Outcome,
    Override,
    PolicyCache,
    Verdict,
    check_message,
    comment,
    identifiers,
)
from tampu.plugins.dmarc.record import DmarcRecord, RecordError, parse_record

__all__ = ["DMARC_OUTCOME", "DmarcPlugin", "DmarcRecord", "Outcome", "RecordError",
           "Verdict", "parse_record"]

DMARC_OUTCOME: StashKey[Outcome] = StashKey()
"""``envelope.stash[DMARC_OUTCOME]``: the evaluation of the transaction's message."""



class DmarcSettings(PluginSettings):
    priority: int = Field(default=150, description="Order on each hook: lower runs first. "
                          "High by default so that the SPF (20) and DKIM plugins have recorded "
                          "their results before DMARC reads them at end of DATA.")
    on_reject: Override = Field(default="reject", description="What tampu does when the "
                                "policy says reject: reject (550 5.7.1 at end of DATA), "
                                "quarantine (accept with the mark header) or accept.")
    on_quarantine: Override = Field(default="quarantine", description="What tampu does when "
                                    "the policy says quarantine: reject, quarantine or accept.")
    on_temperror: Literal["accept", "tempfail"] = Field(
        default="accept", description="When the policy lookup fails (DNS timeout, SERVFAIL): "
        "accept (recorded as dmarc=temperror) or tempfail (451 4.4.3, the client retries).")
    exempt: list[str] = Field(default_factory=list, description="From domains (and their "
                              "subdomains) whose messages are never rejected or marked; their "
                              "result is still recorded.")
    quarantine_header: str = Field(default="X-Tampu-DMARC", description="Header added, with "
                                   "the value 'quarantine', to a message accepted under a "
                                   "quarantine decision, for the MDA or a Sieve script.")
    timeout: float = Field(default=10.0, gt=0, description="Seconds the whole evaluation may "
                           "take (each DNS query is limited by [server] dns_timeout); past "
                           "it: temperror. Also kept under 80% of the hook timeout.")

    @field_validator("exempt")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        out = []
        for domain in value:
            name = orgdomain.canonical(domain)
            if name is None:
                raise ValueError(f"{domain!r} is not a valid domain")
            out.append(name)
        return out

    @field_validator("quarantine_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not valid_header_name(value):
            raise ValueError(f"{value!r} is not a valid header name")
        return value


class DmarcPlugin:
    Settings = DmarcSettings

    def __init__(self, ctx: PluginContext[DmarcSettings]) -> None:
        self.ctx = ctx
        server = ctx.server.config.server
        self.resolver = ctx.server.dns  # the server's one DNS client (TTL cache)
        self.policies = PolicyCache(self.resolver)
        """Discovered policies, while the DNS answers behind them are cached."""
        self.rng = random.Random()
        """The pct= sampler; tests may replace it with a seeded one."""
        settings = ctx.settings
        self.actions = Actions(settings.on_reject, settings.on_quarantine,
                               settings.on_temperror, tuple(settings.exempt))
        hook_timeout = settings.hook_timeout or server.plugin_timeout
        self.timeout = min(settings.timeout, 0.8 * hook_timeout)
        orgdomain.load()
        dkim = ctx.server.config.plugins.get("dkim")
        if dkim is None or not dkim.enabled:
            ctx.log.warning("the dkim plugin is not enabled: DMARC sees no DKIM result, so "
                            "mail that only DKIM aligns (many mailing services) fails DMARC")

    async def evaluate(self, envelope: Envelope, message: Message) -> Outcome:
        """Evaluate the message with the SPF and DKIM results recorded on the envelope."""
        spf = [(r.result, _spf_domain(r)) for r in results(envelope, "spf")]
        dkim = [(r.result, r.prop("header.d") or "") for r in results(envelope, "dkim")]
        ids: Identifiers = identifiers(spf, dkim)
        return await check_message(self.resolver, message.header_values("From"), ids,
                                   self.actions, self.rng, self.timeout, self.policies)

    @hookimpl
    async def smtp_data(self, session: Session, envelope: Envelope,
                        message: Message) -> Reply | None:
        if session.is_submission:
            return None
        outcome = await self.evaluate(envelope, message)
        envelope.stash[DMARC_OUTCOME] = outcome
        log = self.ctx.log
        debug = log.isEnabledFor(logging.DEBUG)  # nothing to pay at the default level
        for verdict, decision in outcome.checked:
            add_result(envelope, method_result(verdict, decision))
            if debug:
                log.debug("session=%s DMARC %s for header.from=%s (%s): %s", session.id,
                          verdict.result, verdict.domain or "-",
                          comment(verdict, decision) or outcome.problem, decision.action)
        return self.apply(outcome.decision, outcome.deciding, message)

    def apply(self, decision: Decision, verdict: Verdict | None,
              message: Message) -> Reply | None:
        domain = verdict.domain if verdict is not None else ""
        if decision.action == "reject":
            return Reply(550, "5.7.1", f"Message refused by the DMARC policy of {domain}")
        if decision.action == "tempfail":
            return Reply(451, "4.4.3", f"DMARC policy of {domain} unavailable, try again later")
        if decision.action == "quarantine":
            message.add_header(self.ctx.settings.quarantine_header, "quarantine")
        return None


def method_result(verdict: Verdict, decision: Decision) -> MethodResult:
    """The Authentication-Results entry: ``dmarc=fail (p=reject dis=reject)
    header.from=example.com``; errors carry their reason."""
    props = (("header.from", verdict.domain),) if verdict.domain else ()
    if verdict.result in ("pass", "fail"):
        return MethodResult("dmarc", verdict.result, props, comment=comment(verdict, decision))
    return MethodResult("dmarc", verdict.result, props, reason=verdict.reason)


def _spf_domain(result: MethodResult) -> str:
    """The SPF-authenticated domain: of ``smtp.mailfrom``, or ``smtp.helo`` for ``<>``."""
    mailfrom = result.prop("smtp.mailfrom")
    if mailfrom:
        return mailfrom.rpartition("@")[2]
    return result.prop("smtp.helo") or ""
