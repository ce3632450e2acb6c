"""The aliases file format, as chasquid reads it (``domains/<domain>/aliases``).

::

    # comment
    pepe: jose                        # domain optional: jose@<this domain>
    flowers: rose@backgarden, lilly@pond
    null: | cat                       # pipe: the message on the command's stdin
    relay: someone@example.org via mx1.example.net/[192.0.2.1]:2525
    *: pepe                           # catch-all, for unknown users
    *: *@other.example                # '*' on the right: the original user

Later lines override earlier ones; users and domains are normalized as everywhere in tampu
(:mod:`tampu.addresses`: case-mapped users, canonical IDNA 2008 domains); UTF-8. A ``#``
after white space starts a comment that runs to the end of the line. Drop characters are
removed from the left side up to the first suffix separator (the suffix is kept, so
``juana.perez+fruta`` has its own alias). Any malformed line makes the whole file invalid,
with its line number in the error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from tampu.addresses import AddressError, lookup_key, normalize_address, normalize_domain


class Kind(StrEnum):
    EMAIL = "email"
    PIPE = "pipe"
    FORWARD = "forward"
    """An address sent through the given hosts (``addr via host1/host2``)."""


@dataclass(frozen=True)
class Target:
    """One element of an alias's right-hand side."""

    kind: Kind
    value: str
    """The address (email, forward) or the command line (pipe)."""
    via: tuple[str, ...] = field(default=())


class AliasesError(Exception):
    """A malformed aliases file or hook output."""


_COMMENT = re.compile(r"\s#.*$")


def remove_drop_characters(address: str, drop: str, separators: str) -> str:
    """Drop characters removed from the user up to the first suffix separator; normalized."""
    user, _, domain = address.rpartition("@")
    cut = next((i for i, c in enumerate(user) if c in separators), len(user))
    head = "".join(c for c in user[:cut] if c not in drop)
    return normalize_address(f"{head}{user[cut:]}@{domain}")


def remove_drops_and_suffix(address: str, drop: str, separators: str) -> str:
    """The clean form: suffix (from the first separator on) and drop characters removed."""
    user, _, domain = address.rpartition("@")
    return f"{lookup_key(user, separators, drop)}@{normalize_domain(domain)}"


def parse_rhs(raw: str, domain: str) -> list[Target]:
    """Parse a right-hand side (also the output of the alias-resolve hook)."""
    raw = raw.strip()
    if not raw:
        return []
    if raw.startswith("|"):
        command = raw[1:].strip()
        if not command:
            raise AliasesError("the pipe alias is missing a command")
        return [Target(Kind.PIPE, command)]
    targets = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue  # "a: b," is allowed
        kind = Kind.EMAIL
        via: tuple[str, ...] = ()
        if " via " in part:
            kind = Kind.FORWARD
            part, via = _parse_via(part)
        if any(c.isspace() for c in part):
            raise AliasesError(f"invalid address {part!r}")
        if "@" not in part:
            part = f"{part}@{domain}"
        user, _, dom = part.rpartition("@")
        if not user or not dom:
            raise AliasesError(f"invalid address {part!r}")
        try:
            targets.append(Target(kind, normalize_address(part), via))
        except AddressError as exc:
            raise AliasesError(str(exc)) from None
    return targets


def _parse_via(raw: str) -> tuple[str, tuple[str, ...]]:
    address, _, servers = raw.partition(" via ")
    address = address.strip()
    if not address:
        raise AliasesError("the forwarding alias is missing the address")
    hosts = []
    for server in servers.split("/"):
        server = server.strip()
        if not server:
            raise AliasesError("empty server in via list")
        hosts.append(server)
    return address, tuple(hosts)


def parse_aliases(text: str, domain: str, *, drop: str = ".",
                  separators: str = "+") -> dict[str, list[Target]]:
    """Parse one domain's aliases file: ``{lookup address: targets}``. Raises AliasesError."""
    domain = normalize_domain(domain)
    aliases: dict[str, list[Target]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", line).strip()
        if not line or line.startswith("#"):
            continue
        lhs, colon, rhs = line.partition(":")
        if not colon:
            raise AliasesError(f"line {lineno}: missing ':' in line")
        lhs, rhs = lhs.strip(), rhs.strip()
        if not lhs or not rhs:
            raise AliasesError(f"line {lineno}: missing address or alias")
        if "@" in lhs:
            raise AliasesError(f"line {lineno}: left-side: cannot contain @")
        if any(c.isspace() or c == "," for c in lhs):
            raise AliasesError(f"line {lineno}: left-side: invalid user {lhs!r}")
        key = remove_drop_characters(f"{lhs}@{domain}", drop, separators)
        try:
            aliases[key] = parse_rhs(rhs, domain)
        except AliasesError as exc:
            raise AliasesError(f"line {lineno}: right-side: {exc}") from None
    return aliases
