"""DANE for SMTP (RFC 7672, RFC 6698): TLSA discovery for an MX host and certificate matching.

DANE applies to an MX host only when the DNS answers that lead to it are DNSSEC-validated, which
tampu learns from the AD bit its resolver sets (``Answer.authenticated``). tampu does not
validate DNSSEC itself: ``[server] dns_servers`` must name a **validating** resolver that the
server can trust, on the same machine (e.g. unbound on 127.0.0.1), or the AD bit means nothing.

:func:`lookup` decides, for one MX host, whether DANE applies:

* the domain's MX RRset must be authenticated (RFC 7672 2.2.1; for a domain without MX, the
  NODATA answer), and the host's address records too (A and/or AAAA; 2.2.2); else None;
* then ``_<port>._tcp.<host>`` TLSA (port 25 in production): a lookup that fails (SERVFAIL,
  timeout) raises :class:`DaneLookupError` — the host must not be used, since its records may
  be hidden by an attacker (2.2); an unauthenticated answer or no records: None;
* otherwise a :class:`DaneHost` with the usable records: usages DANE-TA(2) and DANE-EE(3),
  selectors 0 and 1, matching types 0, 1 and 2. PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP
  (3.1.3); when every record is unusable, TLS stays mandatory but unauthenticated (2.2).

:func:`verify` checks a presented certificate chain against the records:

* DANE-EE(3): the end-entity certificate (selector 0) or its public key (selector 1) matches;
  neither its names nor its validity dates are checked (3.1.1);
* DANE-TA(2): a certificate of the presented chain (not the end-entity one) matches, the end
  certificate chains to it through the presented certificates (each link's signature checked,
  each issuer a CA), the certificates below the trust anchor are within their validity dates,
  and the end certificate is valid for the MX host name (the TLSA base domain; 3.2.2, 3.2.3).
  The trust anchor must be in the presented chain (servers are asked to include it, 3.2.2): a
  TLSA record of a key that is not in the chain cannot be matched.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from tampu.dns import Answer, DnsTempError, Resolver, to_ascii

if TYPE_CHECKING:  # cryptography (~8 MiB) is imported by the first certificate check
    from cryptography import x509

DANE_TA: Final = 2
DANE_EE: Final = 3
MAX_CHAIN: Final = 10


class DaneLookupError(Exception):
    """The TLSA records (or the DNSSEC status leading to them) could not be learned: the host
    must not be used for now (RFC 7672 2.2)."""


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """Usable for SMTP: DANE-TA or DANE-EE, selector 0/1, matching type 0/1/2."""
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) and \
            self.mtype in (0, 1, 2)

    def __str__(self) -> str:
        data = self.data.hex()
        return f"{self.usage} {self.selector} {self.mtype} " + \
            (data if len(data) <= 16 else data[:16] + "...")

    def matches(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` (or its public key, for selector 1) is what this record names."""
        return association(cert, self.selector, self.mtype) == self.data


@dataclass(frozen=True, slots=True)
class DaneHost:
    """The DANE TLSA RRset of one MX host, from an authenticated answer."""

    host: str
    """The TLSA base domain: the MX host name (A-label form)."""
    name: str
    """The owner of the records, ``_25._tcp.<host>``."""
    records: tuple[Tlsa, ...]
    """The usable records; empty when every published record is unusable."""
    published: int
    """How many records were published (usable or not)."""

    @property
    def usable(self) -> bool:
        return bool(self.records)


def association(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    """The certificate association data of ``cert`` for a selector and matching type."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    if selector == 0:
        data = cert.public_bytes(Encoding.DER)
    elif selector == 1:
        data = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    else:
        raise ValueError(f"unknown TLSA selector {selector}")
    if mtype == 0:
        return data
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    raise ValueError(f"unknown TLSA matching type {mtype}")


def tlsa_name(host: str, port: int = 25) -> str:
    return f"_{port}._tcp.{to_ascii(host)}"


def _records(answer: Answer) -> list[Tlsa]:
    out = []
    for r in answer.records:
        if all(hasattr(r, a) for a in ("usage", "selector", "mtype", "cert")):
            out.append(Tlsa(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)))
    return out


async def _secure_addresses(resolver: Resolver, host: str) -> bool:
    """The host has address records and every answer that has some is authenticated."""
    found = False
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.query(host, rdtype)
        except DnsTempError:
            continue  # that type is not usable; the delivery goes by the others
        if answer.records:
            if not answer.authenticated:
                return False
            found = True
    return found


async def lookup(resolver: Resolver, domain: str | None, host: str,
                 port: int = 25) -> DaneHost | None:
    """The DANE records of MX ``host`` of ``domain`` (None: ``host`` is not an MX, e.g. a
    relay, and only its own records count). None when DANE does not apply; raises
    DaneLookupError when the host must not be used now."""
    try:
        if domain is not None and not (await resolver.query(domain, "MX")).authenticated:
            return None
        if not await _secure_addresses(resolver, host):
            return None
    except DnsTempError as exc:
        raise DaneLookupError(f"DNSSEC status of {host} unknown: {exc}") from None
    except ValueError:
        return None  # not a DNS name (an address literal): no DANE
    name = tlsa_name(host, port)
    try:
        answer = await resolver.query(name, "TLSA")
    except DnsTempError as exc:
        raise DaneLookupError(f"TLSA lookup for {name} failed: {exc}") from None
    if not answer.authenticated or not answer.records:
        return None
    records = _records(answer)
    return DaneHost(host=to_ascii(host), name=name,
                    records=tuple(r for r in records if r.usable), published=len(records))


# ---------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    detail: str
    """What matched (``DANE-EE 3 1 1 ...``) or why nothing did."""


def verify(chain: Sequence[bytes], dane: DaneHost,
           now: datetime.datetime | None = None) -> Verdict:
    """Check the presented chain (DER, end-entity certificate first) against ``dane``."""
    from cryptography import x509
    certs: list[x509.Certificate] = []
    for der in chain[:MAX_CHAIN]:
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue
    if not certs:
        return Verdict(False, f"{dane.host} presented no certificate")
    leaf = certs[0]
    for record in dane.records:
        if record.usage == DANE_EE and record.matches(leaf):
            return Verdict(True, f"DANE-EE {record}")
    ta_records = [r for r in dane.records if r.usage == DANE_TA]
    problems: list[str] = []
    if ta_records:
        when = now or datetime.datetime.now(datetime.UTC)
        for record in ta_records:
            anchors = [c for c in certs[1:] if record.matches(c)]
            if not anchors:
                continue
            problem = _chains_to(leaf, certs[1:], anchors, dane.host, when)
            if problem is None:
                return Verdict(True, f"DANE-TA {record}")
            problems.append(problem)
    count = len(dane.records)
    detail = f"the certificate of {dane.host} matches none of its {count} usable TLSA " \
             f"record{'s' if count != 1 else ''} ({dane.name})"
    if problems:
        detail += f": {problems[0]}"
    return Verdict(False, detail)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # ValueError, TypeError, InvalidSignature, unsupported algorithms
        return False
    return True


def _ca_problem(cert: x509.Certificate, anchor: bool) -> str | None:
    from cryptography import x509
    try:
        bc: Any = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None if anchor else "an intermediate certificate is not a CA"
    if not bc.ca:
        return "an issuing certificate is not a CA"
    try:
        ku: Any = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    return None if ku.key_cert_sign else "an issuing certificate may not sign certificates"


def _in_time(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _chains_to(leaf: x509.Certificate, pool: list[x509.Certificate],
               anchors: list[x509.Certificate], host: str,
               now: datetime.datetime) -> str | None:
    """None when ``leaf`` chains to one of ``anchors`` through ``pool`` and is valid for
    ``host``; else the reason."""
    if not names_match(leaf, host):
        return f"the certificate is not valid for {host}"
    current = leaf
    used: list[x509.Certificate] = []
    for _ in range(MAX_CHAIN):
        if not _in_time(current, now):
            return "a certificate below the trust anchor is expired or not yet valid"
        issuer = next((c for c in pool if c not in used and c.subject == current.issuer
                       and _signed_by(current, c)), None)
        if issuer is None:
            return "the certificate does not chain to the trust anchor"
        is_anchor = issuer in anchors
        problem = _ca_problem(issuer, is_anchor)
        if problem is not None:
            return problem
        if is_anchor:
            return None
        used.append(issuer)
        current = issuer
    return "the chain is too long"


def cert_names(cert: x509.Certificate) -> list[str]:
    """The DNS names of ``cert``: its subjectAltName dNSNames, else its subject CNs."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        san: Any = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return names


def names_match(cert: x509.Certificate, host: str) -> bool:
    """RFC 6125 matching of ``host``: exact, or a ``*`` that is the whole leftmost label."""
    want = host.lower().rstrip(".")
    for name in cert_names(cert):
        name = name.lower().rstrip(".")
        if name == want:
            return True
        if name.startswith("*.") and "*" not in name[2:]:
            first, dot, rest = want.partition(".")
            if dot and first and rest == name[2:] and "." in rest:
                return True
    return False
