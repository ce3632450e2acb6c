"""DMARC evaluation (RFC 7489 section 6.6): policy discovery, alignment, pct sampling, and the
operator's decision. Plain async functions over a :class:`tampu.dns.Resolver`; the plugin
(``__init__.py``) only feeds them the recorded SPF/DKIM results and applies the decision.

    lookup = await discover_policy(resolver, "mail.example.co.uk")
    verdict = evaluate(lookup, Identifiers(spf=("example.co.uk",), dkim=()), rng)
    decision = decide(verdict, Actions())
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from tampu.dns import DerivedCache, DnsTempError, Resolver
from tampu.plugins.dmarc.author import author_domains
from tampu.plugins.dmarc.orgdomain import aligned, canonical, organizational_domain
from tampu.plugins.dmarc.record import (
    DmarcRecord,
    Policy,
    RecordError,
    is_dmarc_record,
    parse_record,
)

Result = Literal["pass", "fail", "none", "temperror", "permerror"]
Action = Literal["accept", "quarantine", "reject", "tempfail"]
Override = Literal["reject", "quarantine", "accept"]

_LOWER: Final[dict[Policy, Policy]] = {"reject": "quarantine", "quarantine": "none",
                                       "none": "none"}
SEVERITY: Final[dict[Action, int]] = {"accept": 0, "quarantine": 1, "tempfail": 2, "reject": 3}
"""How strict an action is, to pick the strictest of several From domains."""


# ---------------------------------------------------------------------------- discovery


@dataclass(frozen=True, slots=True)
class PolicyLookup:
    """What policy discovery (6.6.3) found for one RFC5322.From domain."""

    domain: str
    """The From domain (canonical A-label form)."""
    status: Literal["found", "none", "temperror", "permerror"]
    record: DmarcRecord | None = None
    source: str = ""
    """The domain whose ``_dmarc`` record it is: the From domain or its organizational one."""
    reason: str = ""

    @property
    def subdomain_policy(self) -> bool:
        """The record came from the organizational domain of a subdomain: ``sp`` applies."""
        return bool(self.source) and self.source != self.domain


PolicyCache = DerivedCache[str, PolicyLookup]
"""Discovered policies by canonical domain, as long as the DNS answers behind them are cached."""


async def discover_policy(resolver: Resolver, domain: str,
                          cache: PolicyCache | None = None) -> PolicyLookup:
    """Find the DMARC record of ``domain``: ``_dmarc.<domain>``, else ``_dmarc.<org domain>``.

    A DNS failure (timeout, SERVFAIL) gives ``temperror``; several DMARC records at one name
    give ``none`` (6.6.3 step 5); an invalid record gives ``permerror``. With ``cache``, a
    lookup is kept there until the first DNS answer it used expires (a temperror is not).
    """
    name = canonical(domain)
    if name is None:
        return PolicyLookup(domain, "permerror", reason=f"invalid From domain {domain[:60]}")
    if cache is not None:
        kept = cache.get(name)
        if kept is not None:
            return kept
    used: list[tuple[str, str]] = []
    lookup = await _discover(resolver, name, used)
    if cache is not None and lookup.status != "temperror":
        cache.put(name, lookup, used)
    return lookup


async def _discover(resolver: Resolver, name: str, used: list[tuple[str, str]]) -> PolicyLookup:
    org = organizational_domain(name)
    for source in dict.fromkeys((name, org)):
        used.append((f"_dmarc.{source}", "TXT"))
        try:
            answer = await resolver.query(f"_dmarc.{source}", "TXT")
        except DnsTempError as exc:
            return PolicyLookup(name, "temperror", reason=str(exc))
        except ValueError as exc:  # not a possible DNS name (too long)
            return PolicyLookup(name, "permerror", reason=str(exc))
        records = [t for t in answer.texts() if is_dmarc_record(t)]
        if len(records) > 1:
            return PolicyLookup(name, "none", source=source,
                                reason=f"{len(records)} DMARC records at _dmarc.{source}")
        if records:
            try:
                record = parse_record(records[0])
            except RecordError as exc:
                return PolicyLookup(name, "permerror", source=source,
                                    reason=f"_dmarc.{source}: {exc}")
            return PolicyLookup(name, "found", record, source)
    return PolicyLookup(name, "none", reason="no DMARC record")


# ---------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, slots=True)
class Identifiers:
    """The domains SPF and DKIM authenticated (passing results only)."""

    spf: tuple[str, ...] = ()
    """The SPF-authenticated domain: of MAIL FROM, or of HELO for the null sender."""
    dkim: tuple[str, ...] = ()
    """The ``d=`` of each passing DKIM signature."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The DMARC result for one From domain and what its owner asks for."""

    domain: str
    result: Result
    lookup: PolicyLookup
    policy: Policy | None = None
    """The policy that applies (``p``, or ``sp`` for a subdomain); None without a record."""
    requested: Policy = "none"
    """What the domain asks for this message: ``policy`` after ``pct`` sampling (6.6.4:
    a message not sampled gets the next lower policy)."""
    sampled: bool = True
    spf_aligned: str = ""
    dkim_aligned: str = ""
    reason: str = ""


def evaluate(lookup: PolicyLookup, ids: Identifiers, rng: random.Random) -> Verdict:
    """Alignment and pct sampling for a discovered policy (6.6.2, 6.6.4)."""
    if lookup.status != "found" or lookup.record is None:
        result: Result = "none" if lookup.status == "found" else lookup.status
        return Verdict(lookup.domain, result, lookup, reason=lookup.reason)
    record = lookup.record
    spf = next((d for d in ids.spf if aligned(d, lookup.domain, record.aspf)), "")
    dkim = next((d for d in ids.dkim if aligned(d, lookup.domain, record.adkim)), "")
    policy = record.policy_for(lookup.subdomain_policy)
    if spf or dkim:
        return Verdict(lookup.domain, "pass", lookup, policy, "none", True, spf, dkim)
    sampled = record.pct >= 100 or rng.randrange(100) < record.pct
    requested = policy if sampled else _LOWER[policy]
    return Verdict(lookup.domain, "fail", lookup, policy, requested, sampled,
                   reason="no aligned SPF or DKIM pass")


async def evaluate_domain(resolver: Resolver, domain: str, ids: Identifiers,
                          rng: random.Random, cache: PolicyCache | None = None) -> Verdict:
    """Discovery plus evaluation for one From domain."""
    return evaluate(await discover_policy(resolver, domain, cache), ids, rng)


# ---------------------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class Actions:
    """What the operator does when a policy asks for something (the plugin's settings)."""

    on_reject: Override = "reject"
    on_quarantine: Override = "quarantine"
    on_temperror: Literal["accept", "tempfail"] = "accept"
    exempt: tuple[str, ...] = field(default=())
    """Canonical domains (and their subdomains) never rejected or marked."""

    def is_exempt(self, domain: str) -> bool:
        return any(domain == e or domain.endswith("." + e) for e in self.exempt)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    disposition: Policy
    """What was done, in RFC 7489 terms (``dis=``): none, quarantine or reject."""
    exempt: bool = False


def decide(verdict: Verdict, actions: Actions) -> Decision:
    """The operator's action for one verdict: overrides, exemptions, temperror handling."""
    exempt = actions.is_exempt(verdict.domain)
    if verdict.result == "temperror":
        tempfail = actions.on_temperror == "tempfail" and not exempt
        return Decision("tempfail" if tempfail else "accept", "none", exempt)
    if verdict.result != "fail" or verdict.requested == "none" or exempt:
        return Decision("accept", "none", exempt)
    chosen = actions.on_reject if verdict.requested == "reject" else actions.on_quarantine
    if chosen == "accept":
        return Decision("accept", "none")
    return Decision(chosen, chosen)


def strictest(decisions: Iterable[Decision]) -> Decision:
    """The strictest of several decisions (several From domains): reject > tempfail >
    quarantine > accept."""
    return max(decisions, key=lambda d: SEVERITY[d.action],
               default=Decision("accept", "none"))


def comment(verdict: Verdict, decision: Decision) -> str:
    """The Authentication-Results comment: ``p=reject dis=quarantine`` (RFC 7489 11.2 style,
    as the large receivers write it); ``sp=`` when the record has one, ``pct=`` below 100."""
    record = verdict.lookup.record
    if record is None or verdict.result not in ("pass", "fail"):
        return verdict.reason
    parts = [f"p={record.p}"]
    if record.sp_explicit:
        parts.append(f"sp={record.sp}")
    if record.pct < 100:
        parts.append(f"pct={record.pct}")
    parts.append(f"dis={decision.disposition}")
    if decision.exempt:
        parts.append("exempt")
    return " ".join(parts)


def identifiers(spf: Sequence[tuple[str, str]], dkim: Sequence[tuple[str, str]]) -> Identifiers:
    """From ``(result, domain)`` pairs of the recorded SPF and DKIM results: the passing
    domains, canonical, deduplicated."""
    def passing(pairs: Sequence[tuple[str, str]]) -> tuple[str, ...]:
        found = (canonical(d) for r, d in pairs if r.lower() == "pass" and d)
        return tuple(dict.fromkeys(d for d in found if d is not None))
    return Identifiers(passing(spf), passing(dkim))


# ---------------------------------------------------------------------------- one message


@dataclass(frozen=True, slots=True)
class Outcome:
    """The evaluation of one message: a verdict and a decision per From domain, and the
    strictest decision, which the message gets."""

    checked: tuple[tuple[Verdict, Decision], ...]
    decision: Decision
    problem: str = ""
    """What is unusual about the From header(s) (see :mod:`.author`)."""

    @property
    def deciding(self) -> Verdict | None:
        """The verdict behind ``decision`` (the first of the strictest)."""
        return next((v for v, d in self.checked if d == self.decision), None)


async def check_message(resolver: Resolver, from_values: list[str], ids: Identifiers,
                        actions: Actions, rng: random.Random, limit: float,
                        cache: PolicyCache | None = None) -> Outcome:
    """Evaluate DMARC for a message with these ``From:`` header values, within ``limit``
    seconds (past it, every domain is ``temperror``). With ``cache``, policies found before
    are used while their DNS answers are cached (then nothing is awaited)."""
    authors = author_domains(from_values)
    if not authors.domains:
        verdict = Verdict("", "permerror", PolicyLookup("", "permerror"),
                          reason=authors.problem)
        decision = decide(verdict, actions)
        return Outcome(((verdict, decision),), decision, authors.problem)
    kept = [cache.get(d) for d in authors.domains] if cache is not None else [None]
    try:
        if all(k is not None for k in kept):  # no lookup: no timer, no turn of the loop
            verdicts = [evaluate(k, ids, rng) for k in kept if k is not None]
        else:
            async with asyncio.timeout(limit):
                if len(authors.domains) == 1:  # the usual case: no task (a turn of the loop)
                    verdicts = [await evaluate_domain(resolver, authors.domains[0], ids, rng,
                                                      cache)]
                else:
                    verdicts = await asyncio.gather(*(
                        evaluate_domain(resolver, d, ids, rng, cache) for d in authors.domains))
    except TimeoutError:
        reason = f"DMARC evaluation took more than {limit:g}s"
        verdicts = [Verdict(d, "temperror", PolicyLookup(d, "temperror", reason=reason),
                            reason=reason) for d in authors.domains]
    checked = tuple((v, decide(v, actions)) for v in verdicts)
    return Outcome(checked, strictest(d for _, d in checked), authors.problem)
