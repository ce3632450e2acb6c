"""Which TLS each outgoing connection must have: DANE, MTA-STS, or opportunistic TLS.

For one recipient domain, :meth:`OutboundSecurity.plan` looks up its MTA-STS policy once;
:meth:`DomainPlan.requirement` then decides per MX host (RFC 8461 2: DANE first):

1. DANE (when enabled): a host with authenticated, usable TLSA records gets a
   :class:`TlsRequirement` whose ``verify`` matches the presented chain against them; a host
   whose TLSA lookup failed is refused for now (:class:`HostRefused`); a host whose records are
   all unusable gets mandatory TLS without authentication (unless MTA-STS enforce asks more);
2. MTA-STS ``enforce``: an MX host that the policy does not list is refused; a listed one must
   do TLS (1.2 or later) with a certificate that verifies for its name;
3. MTA-STS ``testing``: what enforce would refuse is logged (and noted in the result text),
   and the mail goes as it would without a policy;
4. otherwise ``None``: opportunistic TLS as before (``client.Attempt.open``).

A :class:`TlsRequirement` is applied by ``client.Attempt``: TLS or nothing, never a plaintext
or unverified fallback; a failure is a temporary failure whose text starts with ``reason``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tampu import DeliveryResult
from tampu.dns import Resolver
from tampu.plugins.delivery_smtp import dane
from tampu.plugins.delivery_smtp.client import LevelCheck
from tampu.plugins.delivery_smtp.mta_sts import MtaSts, StsPolicy
from tampu.plugins.domaininfo.store import SecLevel

log = logging.getLogger("tampu.plugins.delivery_smtp.tls_policy")

Verify = Callable[["ssl.SSLObject | None"], "str | None"]
"""After the handshake: None when the peer is acceptable, else why not."""


@dataclass(frozen=True, slots=True)
class TlsRequirement:
    """TLS that a connection must have, or no mail is sent over it."""

    reason: str
    """Who asks, for messages: ``MTA-STS policy for example.com (enforce)``, ``DANE``..."""
    context: ssl.SSLContext
    level: SecLevel = SecLevel.TLS_VERIFIED
    """The security level the connection has when the requirement holds (for domaininfo)."""
    implicit: bool = False
    """TLS from the first byte (a smarthost on port 465) instead of STARTTLS."""
    verify: Verify | None = None


def verified_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """TLS 1.2 or later, a certificate chaining to a trusted CA and valid for the host name."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def unverified_context() -> ssl.SSLContext:
    """TLS whose certificate is judged afterwards (DANE) or not at all (unusable TLSA).

    No CA is loaded: loading the system's takes tens of milliseconds, so the contexts are made
    once per plugin instance, never per connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_chain(ssl_object: ssl.SSLObject | None) -> list[bytes]:
    """The certificates the peer presented (DER, its own first).

    Python 3.13 has ``SSLObject.get_unverified_chain()``; 3.11 and 3.12 have the same method on
    the underlying ``_ssl`` object. Without either, only the peer's own certificate is known
    (DANE-TA records then cannot match).
    """
    if ssl_object is None:
        return []
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        import _ssl

        der = getattr(_ssl, "ENCODING_DER", 2)
        try:
            chain = getter() or []
        except (ssl.SSLError, ValueError):
            chain = []
        out = [c if isinstance(c, bytes) else bytes(c.public_bytes(der)) for c in chain]
        if out:
            return out
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


class HostRefused(Exception):
    """This MX host must not be used now; ``result`` says why (a temporary failure)."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.text)
        self.result = result


def _refused(text: str, host: str, enhanced: str = "4.7.5") -> HostRefused:
    return HostRefused(DeliveryResult.temporary(text, enhanced=enhanced, remote=host))


def dane_requirement(found: dane.DaneHost, context: ssl.SSLContext) -> TlsRequirement:
    """TLS (with ``context``, which verifies nothing) whose chain must match ``found``'s usable
    records."""

    def check(ssl_object: ssl.SSLObject | None) -> str | None:
        verdict = dane.verify(peer_chain(ssl_object), found)
        if verdict.ok:
            log.info("DANE: %s authenticated by %s", found.host, verdict.detail)
            return None
        return verdict.detail

    return TlsRequirement(reason=f"DANE ({found.name})", context=context, verify=check)


@dataclass
class DomainPlan:
    """The TLS decisions for one delivery attempt to one recipient domain."""

    domain: str
    sts: StsPolicy | None
    security: OutboundSecurity
    notes: dict[str, list[str]] = field(default_factory=dict)
    """MTA-STS testing findings per host, added to the text of a delivery through it."""

    async def requirement(self, host: str, port: int) -> TlsRequirement | None:
        """What a connection to MX ``host`` must have (None: opportunistic TLS).

        Raises HostRefused when the host must not be used.
        """
        sec = self.security
        found: dane.DaneHost | None = None
        if sec.dane:
            try:
                found = await dane.lookup(sec.resolver, self.domain, host, port)
            except dane.DaneLookupError as exc:
                raise _refused(f"DANE: {exc}; {host} is not used without its TLSA records",
                               host, "4.7.5") from None
            if found is not None and found.usable:
                return dane_requirement(found, sec.unverified)
        sts = self.sts
        if sts is not None and sts.mode == "enforce":
            if not sts.allows(host):
                raise _refused(f"{sts.label} does not allow {host} (mx: "
                               f"{', '.join(sts.policy.mx)})", host)
            return TlsRequirement(reason=f"{sts.label} requires TLS with a certificate valid "
                                  f"for {host}", context=sec.verified)
        if found is not None:  # TLSA records, none usable: TLS, not authenticated (7672 2.2)
            return TlsRequirement(reason=f"DANE ({found.name}, no usable record) requires TLS",
                                  context=sec.unverified, level=SecLevel.TLS_UNVERIFIED)
        if sts is not None and sts.mode == "testing" and not sts.allows(host):
            self._note(host, f"{sts.label}: enforce would not allow {host}")
        return None

    def level_check(self, host: str, inner: LevelCheck | None) -> LevelCheck | None:
        """``inner`` (domaininfo's check), plus, in MTA-STS testing mode, a note when the
        connection to ``host`` is below what enforce would require."""
        sts = self.sts
        if sts is None or sts.mode != "testing":
            return inner

        async def check(level: SecLevel) -> bool:
            if level < SecLevel.TLS_VERIFIED:
                self._note(host, f"{sts.label}: enforce would refuse {host}: connection "
                           f"{level.label}, not TLS with a valid certificate")
            return True if inner is None else await inner(level)

        return check

    def _note(self, host: str, text: str) -> None:
        log.warning("%s (delivering anyway)", text)
        self.notes.setdefault(host, []).append(text)

    def annotate(self, host: str, result: DeliveryResult) -> DeliveryResult:
        """``result`` with the testing findings for ``host`` appended to its text."""
        notes = self.notes.get(host)
        if not notes:
            return result
        return replace(result, text=f"{result.text} [{'; '.join(notes)}]")


class OutboundSecurity:
    """MTA-STS and DANE for the MX deliveries of one plugin instance, and its two TLS
    client contexts: every connection of the instance (MX, smarthost, MTA-STS policy
    fetch) uses them, so the system's CAs are loaded once."""

    def __init__(self, resolver: Resolver, *, mta_sts: MtaSts | None = None, dane: bool,
                 ca_file: Path | None = None) -> None:
        self.resolver = resolver
        self.mta_sts = mta_sts
        self.dane = dane
        self.verified = verified_context(ca_file)
        self.unverified = unverified_context()

    async def plan(self, domain: str) -> DomainPlan:
        """Look up ``domain``'s MTA-STS policy (cached) for this attempt."""
        sts = None
        if self.mta_sts is not None:
            try:
                sts = await self.mta_sts.policy(domain)
            except (OSError, ValueError) as exc:  # e.g. an unwritable cache folder
                log.warning("MTA-STS: policy of %s unavailable: %s", domain, exc)
        return DomainPlan(domain=domain, sts=sts, security=self)

    def close(self) -> None:
        self.resolver.close()
