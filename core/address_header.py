"""The addresses of an address header (``From:``, ``Sender:``, ``To:``) read safely.

Plugins that judge a message by its author (dmarc, sender_policy) read ``From:`` through this
one parser, so they agree on what the message claims. Python's email parser repairs broken
headers (recording a defect) and, on some hostile input, raises from deep inside (for
example ``AttributeError`` on a group in a mailbox list, ``:;0``): any of that makes the value
*unclean*, never an exception for the caller.
"""

from __future__ import annotations

import email.errors
import email.policy
import re
from dataclasses import dataclass
from typing import Final

MAX_HEADER: Final = 4096
"""Longer values are not given to the email parser (its cost grows with the input)."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    local: str
    domain: str
    """Empty when the mailbox has none."""
    addr_spec: str
    """``local@domain`` as RFC 5322 writes it (quoted local part when needed)."""


@dataclass(frozen=True, slots=True)
class HeaderAddresses:
    """The mailboxes of one header value, as the parser read them."""

    addresses: tuple[Mailbox, ...]
    """In order of appearance."""
    clean: bool
    """Parsed without repairs: no invalid-header defect, no parser failure, not overlong."""
    too_long: bool = False


UNREADABLE: Final = HeaderAddresses((), False)

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
_PLAIN = re.compile(rf"(?:(?:[A-Za-z0-9_+-]+(?: [A-Za-z0-9_+-]+)* ?)?<)?({_ATOM}(?:\.{_ATOM})*)@"
                    rf"({_DOMAIN})(>?)")
"""The common form, read without the email parser (about 50 times faster): one mailbox,
``local@domain``, ``<local@domain>`` or ``Display Name <local@domain>`` in plain ASCII
atoms. Anything else (quotes, comments, groups, several mailboxes, non-ASCII) goes to the
email parser; the two agree on what this form accepts (a property test checks it)."""


def parse_address_header(name: str, value: str) -> HeaderAddresses:
    """The mailboxes of header ``name`` with ``value`` (unfolded)."""
    if len(value) > MAX_HEADER:
        return HeaderAddresses((), False, too_long=True)
    plain = _PLAIN.fullmatch(value)
    if plain is not None and (plain.group(3) == ">") == ("<" in value):
        local, domain = plain.group(1), plain.group(2)
        return HeaderAddresses((Mailbox(local, domain, f"{local}@{domain}"),), True)
    try:
        header = email.policy.default.header_factory(name, value)
        addresses = tuple(Mailbox(str(a.username), str(a.domain), str(a.addr_spec))
                          for a in getattr(header, "addresses", ()))
        defects = list(getattr(header, "defects", ()))
    except Exception:  # the stdlib parser on hostile input: unreadable, not a crash
        return UNREADABLE
    clean = not any(isinstance(d, email.errors.InvalidHeaderDefect) for d in defects)
    return HeaderAddresses(addresses, clean)
