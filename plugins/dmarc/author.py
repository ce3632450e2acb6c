"""The RFC5322.From domains of a message (RFC 7489 section 6.6.1).

A well-formed message has exactly one ``From:`` header with one address. For the others,
tampu's choice (the RFC lets receivers choose) is to evaluate **every** author domain and apply
the strictest outcome: several ``From:`` headers, several addresses in one, or a header that
Python's parser had to repair (MUAs may show another address than the one it found) all
count. For a repaired or overlong header, every ``@domain`` in its text is taken too, so that
a spoofed address cannot hide behind a syntax error. No From domain at all gives ``permerror``
(the message is not DMARC-evaluated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from tampu.address_header import parse_address_header
from tampu.plugins.dmarc.orgdomain import canonical

MAX_DOMAINS: Final = 10
"""At most this many distinct author domains are evaluated (DNS work per message)."""

_AT_DOMAIN = re.compile(r"@([A-Za-z0-9\u0080-\U0010ffff][A-Za-z0-9.\-\u0080-\U0010ffff]*)")


@dataclass(frozen=True, slots=True)
class Authors:
    """The author domains (canonical A-label form, in order of appearance, deduplicated)."""

    domains: tuple[str, ...]
    headers: int
    """How many From headers the message has."""
    problem: str = ""
    """Why the From header(s) are not the one-header-one-address RFC 5322 form, if so."""


def author_domains(from_values: list[str]) -> Authors:
    """The domains to evaluate, from the values of the message's ``From:`` headers."""
    found: list[str] = []
    problems: list[str] = []
    if not from_values:
        problems.append("no From header")
    elif len(from_values) > 1:
        problems.append(f"{len(from_values)} From headers")
    for value in from_values:
        parsed, clean = _parse(value)
        if not clean:
            problems.append("malformed From header")
            parsed += [m.group(1) for m in _AT_DOMAIN.finditer(value)]
        elif len(parsed) > 1:
            problems.append("several addresses in From")
        for raw in parsed:
            domain = canonical(raw.rstrip("."))
            if domain is not None and domain not in found:
                found.append(domain)
    if from_values and not found:
        problems.append("no valid domain in From")
    if len(found) > MAX_DOMAINS:
        problems.append(f"more than {MAX_DOMAINS} From domains: the first ones evaluated")
        found = found[:MAX_DOMAINS]
    return Authors(tuple(found), len(from_values), "; ".join(dict.fromkeys(problems)))


def _parse(value: str) -> tuple[list[str], bool]:
    """The domains of the addresses in one header value, and whether it parsed cleanly."""
    header = parse_address_header("from", value)
    domains = [m.domain for m in header.addresses]
    return ([d for d in domains if d], header.clean and all(domains) and bool(domains))
