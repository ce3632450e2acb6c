"""Organizational domains (RFC 7489 section 3.2) and identifier alignment (section 3.1).

The Public Suffix List is the copy shipped inside the ``publicsuffixlist`` package (updated
with each of its releases; nothing is downloaded at run time). Its ICANN and private sections
are both used, as OpenDMARC does: ``alice.github.io`` and ``bob.github.io`` are two
organizations. A name the list does not know ends in an unknown top-level domain, which counts
as a public suffix (``mail.example.test`` → ``example.test``).

Domains are compared in their canonical ASCII (A-label, lower case) form, see
:func:`canonical`.
"""

from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList

from tampu.addresses import AddressError, domain_to_ascii, is_literal
from tampu.plugins.dmarc.record import Alignment


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # parses the shipped list: ~75 ms, once per process


def load() -> None:
    """Parse the list now (at start-up) rather than on the first message."""
    _psl()


def canonical(domain: str) -> str | None:
    """The A-label, lower-case form of a DNS domain; None for an invalid one or a literal."""
    try:
        name = domain_to_ascii(domain.strip())
    except AddressError:
        return None
    if not name or is_literal(name):
        return None
    return name


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """The organizational domain of a canonical domain: the public suffix plus one label
    (``mail.example.co.uk`` → ``example.co.uk``); a public suffix is its own."""
    found = _psl().privatesuffix(domain)
    return found if found is not None else domain


def aligned(authenticated: str, author: str, mode: Alignment) -> bool:
    """Whether an authenticated domain (SPF, DKIM ``d=``) aligns with the RFC5322.From
    domain: ``s`` strict, the same domain; ``r`` relaxed, the same organizational domain."""
    a, b = canonical(authenticated), canonical(author)
    if a is None or b is None:
        return False
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)
