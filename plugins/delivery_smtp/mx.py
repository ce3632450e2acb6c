"""Where to deliver mail for a domain: MX lookup (RFC 5321 5.1, RFC 7505) and host addresses."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from tampu import DeliveryResult
from tampu.dns import DnsTempError, Resolver


@dataclass(frozen=True, slots=True)
class Target:
    """One host to try: its name (for TLS verification and logs) and port."""

    host: str
    port: int


async def mx_hosts(resolver: Resolver, domain: str) -> list[str] | DeliveryResult:
    """The mail hosts of ``domain`` in the order to try them, or the failure to report.

    Lower preference first, random among equal preferences. No MX records: the domain itself
    (its A/AAAA, RFC 5321 5.1). A null MX (RFC 7505) is a permanent failure; a domain that does
    not exist too; DNS trouble (SERVFAIL, timeouts) a temporary one.
    """
    try:
        answer = await resolver.query(domain, "MX")
    except DnsTempError as exc:  # SERVFAIL, timeouts
        return DeliveryResult.temporary(f"DNS lookup of MX for {domain} failed: {exc}",
                                        enhanced="4.4.3")
    except ValueError as exc:
        return DeliveryResult.permanent(f"bad domain {domain}: {exc}", enhanced="5.1.2")
    if answer.nxdomain:
        return DeliveryResult.permanent(f"domain {domain} does not exist", enhanced="5.1.2")
    if not answer.records:
        return [domain]
    records = [(int(r.preference), r.exchange.to_text(omit_final_dot=True))
               for r in answer.records]
    real = [(pref, host) for pref, host in records if host not in ("", ".")]
    if not real:
        return DeliveryResult.permanent(f"domain {domain} does not accept mail (null MX)",
                                        enhanced="5.1.10")
    random.shuffle(real)
    real.sort(key=lambda rec: rec[0])  # stable: equal preferences stay shuffled
    return [host for _, host in real]


async def host_addresses(resolver: Resolver, host: str) -> list[str]:
    """IPv4 then IPv6 addresses of ``host`` (an IP literal is its own address).

    Raises LookupError with a readable reason when there is none.
    """
    literal = host.strip("[]")
    try:
        return [str(ipaddress.ip_address(literal))]
    except ValueError:
        pass
    addresses: list[str] = []
    problems: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.query(host, rdtype)
        except (DnsTempError, ValueError) as exc:
            problems.append(f"{rdtype} lookup of {host} failed: {exc}")
            continue
        if answer.nxdomain:
            problems.append(f"{host} does not exist")
            break
        addresses.extend(r.address for r in answer.records)
    if addresses:
        return addresses
    raise LookupError("; ".join(problems) or f"{host} has no A or AAAA record")


def parse_via(spec: str, default_port: int) -> Target:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address → Target."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        host, _, port = spec.partition(":")
    else:
        host, port = spec, ""
    if port and not port.isdigit():
        raise ValueError(f"bad port in via host {spec!r}")
    return Target(host=host.rstrip(".").lower(), port=int(port) if port else default_port)
