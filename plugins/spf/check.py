"""One SPF evaluation with pyspf, its DNS queries sent to tampu's configured servers.

pyspf looks names up through its module-level ``DNSLookup`` function (dnspython's deprecated
``dns.resolver.query`` on the system's resolver). Rather than patching the module for the whole
process, :class:`SpfChecker` builds a subclass of ``spf.query`` whose ``dns`` method is pyspf's
own code bound to a namespace where ``DNSLookup`` is ours: caching, CNAME chasing and the
RFC 7208 lookup limits stay pyspf's, the queries go to ``[server] dns_servers``.

:meth:`SpfChecker.check_async` evaluates on the event loop without threads: pyspf runs with
a ``DNSLookup`` that answers from the lookups done so far and raises :class:`_NeedLookup` for a
new one; the lookup is then made with dnspython's asynchronous resolver and pyspf runs again
from the start (it is cheap; the answers are remembered), until a run needs nothing new.
:meth:`SpfChecker.check` is the same evaluation with blocking lookups, for a worker thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import types
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.nameserver
import dns.resolver
import spf

from tampu.dns import DerivedCache, DnsTempError, Resolver, parse_server

log = logging.getLogger("tampu.plugins.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def make_resolver(servers: list[str], timeout: float) -> dns.resolver.Resolver:
    """A blocking dnspython resolver for ``servers`` (empty: resolv.conf), for :meth:`check`
    run in a thread; the event loop's path goes through tampu's DNS client."""
    res = dns.resolver.Resolver(configure=not servers)
    if servers:
        res.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                           for host, port in map(parse_server, servers)]
    res.timeout = timeout
    res.lifetime = timeout
    return res


Answers = list[tuple[tuple[str, str], Any]]
MAX_ROUNDS = 40
"""pyspf runs per asynchronous check at most (RFC 7208 allows 10 DNS-querying mechanisms, each
with a few lookups)."""


class _NeedLookup(BaseException):
    """Raised through pyspf (a BaseException: its ``except Exception`` clauses let it pass)."""

    def __init__(self, key: tuple[str, str]) -> None:
        super().__init__(key)
        self.key = key


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for an SMTP reply or a header: printable ASCII, bounded."""
    return _UNPRINTABLE.sub("?", text)[:limit]


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str
    """pass, fail, softfail, neutral, none, temperror or permerror (RFC 7208)."""
    explanation: str
    identity: str
    """The checked identity: the MAIL FROM address, or postmaster@HELO for the null sender."""
    domain: str

    @property
    def passed(self) -> bool:
        return self.result == "pass"


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What one check produced: the result and the two header values."""

    result: SpfResult
    received_spf: str
    """The value of ``Received-SPF:`` (RFC 7208 section 9.1)."""
    scope: str
    """``mailfrom``, or ``helo`` when the null sender made the HELO name the identity."""


class SpfChecker:
    """Evaluates SPF (RFC 7208) for a client IP, sender and HELO name."""

    def __init__(self, servers: list[str], query_timeout: float, total_timeout: float,
                 receiver: str, dns_client: Resolver | None = None) -> None:
        self.resolver = make_resolver(servers, query_timeout)
        self.dns = dns_client or Resolver.from_settings(servers, query_timeout)
        """The server's DNS client (asynchronous lookups, TTL cache)."""
        self.total_timeout = total_timeout
        self.receiver = receiver
        self._active: Any = self._lookup
        """The DNSLookup of the evaluation running now (runs are synchronous: one at a time)."""
        self._query_class = self._make_query_class()
        self._results: DerivedCache[tuple[str, str, str], Evaluation] = DerivedCache(self.dns)
        """Evaluations by (ip, sender, helo), until the first of their DNS answers expires."""

    def _dispatch(self, name: str, qtype: str, strict: Any = True,
                  timeout: float = 20.0) -> Answers:
        return self._active(name, qtype, strict, timeout)

    @staticmethod
    def _convert(answer: Any, name: str, qtype: str) -> Answers:
        out: Answers = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out

    async def _lookup_async(self, name: str, qtype: str) -> Answers | spf.TempError:
        """One lookup through the server's DNS client (which caches answers for their TTL)."""
        try:
            answer = await self.dns.query(name, qtype)
        except DnsTempError as exc:
            return spf.TempError(str(exc))
        except ValueError:  # not a valid DNS name: nothing there
            return []
        return self._convert(answer.records, name, qtype)

    async def check_async(self, ip: str, sender: str, helo: str) -> Evaluation:
        """:meth:`check` on the event loop: DNS through the asynchronous resolver, no thread.

        An evaluation is a function of its inputs and of the DNS answers it used; those are
        cached for their TTL, so the evaluation is kept as long as all of them are (not at
        all when one has TTL 0 or failed): the same client, sender and HELO within that time
        get the same result without running pyspf again."""
        key = (ip, sender, helo)
        kept = self._results.get(key)
        if kept is not None:
            return kept
        answers: dict[tuple[str, str], Answers | spf.TempError] = {}
        first = _first_lookup(sender, helo)
        if first is not None:  # pyspf's first question, asked before it runs: it runs once
            answers[first] = await self._lookup_async(*first)
        evaluation = await self._evaluate_async(ip, sender, helo, answers)
        if evaluation.result.result != "temperror" and \
                not any(isinstance(a, spf.TempError) for a in answers.values()):
            self._results.put(key, evaluation, answers)
        return evaluation

    async def _evaluate_async(self, ip: str, sender: str, helo: str,
                              answers: dict[tuple[str, str], Answers | spf.TempError]
                              ) -> Evaluation:
        try:
            async with asyncio.timeout(self.total_timeout):
                for _ in range(MAX_ROUNDS):
                    missing: list[tuple[str, str]] = []

                    def replay(name: str, qtype: str, strict: Any = True,
                               timeout: float = 20.0) -> Answers:
                        got = answers.get((name, qtype))
                        if got is None:
                            missing.append((name, qtype))
                            raise _NeedLookup((name, qtype))
                        if isinstance(got, spf.TempError):
                            raise spf.TempError(*got.args)
                        return got

                    self._active = replay
                    try:
                        evaluation: Evaluation | None = self.check(ip, sender, helo)
                    except _NeedLookup:
                        evaluation = None
                    finally:
                        self._active = self._lookup
                    # pyspf swallows errors in a few places (exp= lookups): a completed run may
                    # still have asked for something; look it up and run again.
                    if not missing and evaluation is not None:
                        return evaluation
                    for key in dict.fromkeys(missing):
                        answers[key] = await self._lookup_async(*key)
        except TimeoutError:
            pass
        return self._failed(ip, sender, helo, "temperror",
                            f"SPF evaluation took too long ({len(answers)} DNS lookups)")

    def _failed(self, ip: str, sender: str, helo: str, result: str, why: str) -> Evaluation:
        identity = sender or f"postmaster@{helo}"
        domain = identity.rpartition("@")[2].lower()
        header = f"{result.capitalize()} ({self.receiver}: {printable(why)})"
        return Evaluation(SpfResult(result=result, explanation=printable(why),
                                    identity=identity, domain=domain),
                          received_spf=header, scope="mailfrom" if sender else "helo")

    def _lookup(self, name: str, qtype: str, strict: Any = True,
                timeout: float = 20.0) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's DNSLookup contract: [((name, qtype), value)]; TempError on failure."""
        lifetime = max(0.1, min(float(timeout), self.resolver.lifetime))
        try:
            answer = self.resolver.resolve(name, qtype, lifetime=lifetime, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        except dns.exception.Timeout as exc:
            raise spf.TempError(f"DNS timeout looking up {name} {qtype}") from exc
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS error looking up {name} {qtype}: {exc}") from exc
        return self._convert(answer, name, qtype)

    def _make_query_class(self) -> type:
        base_dns = spf.query.dns
        namespace = dict(vars(spf))
        namespace["DNSLookup"] = self._dispatch
        dns_method = types.FunctionType(base_dns.__code__, namespace, base_dns.__name__,
                                        base_dns.__defaults__, base_dns.__closure__)
        return type("TampuSpfQuery", (spf.query,), {"dns": dns_method})

    def check(self, ip: str, sender: str, helo: str) -> Evaluation:
        """Evaluate ``sender`` (``""`` = null sender: ``postmaster@helo``) for ``ip``."""
        ip = _plain_ip(ip)
        identity = sender or f"postmaster@{helo}"
        domain = identity.rpartition("@")[2].lower()
        query = self._query_class(i=ip, s=sender, h=helo, receiver=self.receiver,
                                  querytime=self.total_timeout)
        try:
            result, _code, explanation = query.check()
        except Exception as exc:  # pyspf raises on odd input (strict mode warnings, bad IPs)
            log.warning("SPF check of %s from %s raised %s: %s", identity, ip,
                        type(exc).__name__, exc)
            result, explanation = "temperror", f"SPF evaluation error: {type(exc).__name__}"
        result = str(result).lower()
        if result not in RESULTS:
            result, explanation = "permerror", f"unexpected SPF result {result!r}"
        explanation = printable(str(explanation))
        try:
            header = printable(query.get_header(result, receiver=self.receiver), 900)
        except Exception:  # get_header needs state a failed check may not have
            header = f"{result.capitalize()} ({self.receiver}: {explanation})"
        spf_result = SpfResult(result=result, explanation=explanation, identity=identity,
                               domain=domain)
        return Evaluation(result=spf_result, received_spf=header,
                          scope="mailfrom" if sender else "helo")


def _first_lookup(sender: str, helo: str) -> tuple[str, str] | None:
    """The lookup pyspf makes first (the identity's domain's TXT records, spelled as pyspf
    spells it), or None when it may make none (not a plain DNS name)."""
    name = (sender.rpartition("@")[2] if sender else helo).rstrip(".").lower()
    labels = name.split(".")
    if len(labels) < 2 or not all(0 < len(label) < 64 and label.isascii() for label in labels):
        return None
    return name, "TXT"


def _plain_ip(ip: str) -> str:
    """IPv4-mapped IPv6 (``::ffff:192.0.2.1``) as IPv4; zone index removed."""
    if ":" not in ip:  # IPv4 as the socket gives it: already plain (no parse per message)
        return ip
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)
