"""Addresses: the one place that parses envelope paths and normalizes users and domains.

A domain has one canonical form everywhere (local-domain check, users, aliases, Maildir
paths, domaininfo): IDNA 2008 U-labels (``faß.de``, never ``fass.de``), NFC, lower case, no
trailing dot; ``xn--fa-hia.de`` is the same domain. :func:`domain_to_ascii` gives the A-label
form for DNS. A user part is compared in its case-mapped form (PRECIS UsernameCaseMapped,
RFC 8265, as chasquid does: width mapping, lower case, NFC); :func:`lookup_key` also removes
the address suffix (``+tag``) and the drop characters (``.``).

:func:`parse_path` reads the argument of MAIL FROM / RCPT TO strictly (RFC 5321 4.1.2,
RFC 6531 for SMTPUTF8) and raises :class:`PathError` carrying the reply to send.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from typing import Final

import idna

from tampu.reply import Reply

MAX_LOCAL_PART: Final = 64
MAX_PATH: Final = 256
"""Octets, brackets included (RFC 5321 4.5.3.1)."""

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_LDH_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_ATOM = re.compile(rf"^[{_ATEXT}]+(\.[{_ATEXT}]+)*$")
_DOT_ATOM_UTF8 = re.compile(rf"^[{_ATEXT}\u0080-\U0010ffff]+(\.[{_ATEXT}\u0080-\U0010ffff]+)*$")
_QUOTED = re.compile(r'^"([\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"$')
_INVALID = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?$")


class AddressError(ValueError):
    """A user, domain or address that cannot be normalized."""


# ---------------------------------------------------------------------------- domains


@functools.lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """The canonical form of ``domain``; raises AddressError for one that is not valid.

    Address literals (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) are returned in a canonical
    spelling of their own.
    """
    name = domain.strip().rstrip(".")
    if name.startswith("["):
        return _literal(name)
    lower = name.lower()
    if lower.isascii() and _LDH_DOMAIN.match(lower) and "xn--" not in lower:
        return lower
    try:
        ascii_form = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        unicode_form = idna.decode(ascii_form)
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise AddressError(f"invalid domain {domain!r}: {exc}") from None
    if len(ascii_form) > 253:
        raise AddressError(f"domain {domain!r} is too long")
    return unicodedata.normalize("NFC", unicode_form).lower()


@functools.lru_cache(maxsize=4096)
def domain_to_ascii(domain: str) -> str:
    """The A-label (``xn--``) form of ``domain`` for DNS and for peers without SMTPUTF8."""
    canonical = normalize_domain(domain)
    if canonical.isascii():
        return canonical
    return idna.encode(canonical, uts46=True, transitional=False).decode("ascii")


def is_literal(domain: str) -> bool:
    return domain.startswith("[")


def _literal(text: str) -> str:
    if not text.endswith("]"):
        raise AddressError(f"invalid address literal {text!r}")
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError(f"invalid address literal {text!r}") from None


# ---------------------------------------------------------------------------- users


def normalize_user(user: str) -> str:
    """The case-mapped form of a user part (PRECIS UsernameCaseMapped, RFC 8265):
    full-width forms mapped to their normal width, lower case, NFC."""
    if user.isascii():
        return user.lower()
    mapped = "".join(unicodedata.normalize("NFKC", c)
                     if unicodedata.decomposition(c).startswith(("<wide>", "<narrow>")) else c
                     for c in user)
    return unicodedata.normalize("NFC", mapped.lower())


def lookup_key(user: str, separators: str = "+", drop: str = ".") -> str:
    """The form users and aliases are looked up by: case-mapped, the suffix after the first
    separator removed, drop characters removed (``John.Doe+news`` → ``johndoe``)."""
    key = normalize_user(user)
    cut = min((i for i in (key.find(s) for s in separators) if i > 0), default=-1)
    if cut > 0:
        key = key[:cut]
    for ch in drop:
        key = key.replace(ch, "")
    return key


def split_address(address: str) -> tuple[str, str]:
    """``(user, domain)`` of ``user@domain``; the domain is as written ("" without one)."""
    user, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return user, domain


def domain_of(address: str) -> str:
    """The canonical domain of ``address``, or "" when it has none or it is invalid."""
    _, domain = split_address(address)
    if not domain:
        return ""
    try:
        return normalize_domain(domain)
    except AddressError:
        return ""


def normalize_address(address: str) -> str:
    """``user@domain`` with the user case-mapped and the domain canonical (for lookups and
    for comparing local addresses; remote local parts are sent as they were given)."""
    user, domain = split_address(address)
    if not domain:
        return normalize_user(user)
    return f"{normalize_user(user)}@{normalize_domain(domain)}"


def ascii_address(address: str) -> str:
    """``address`` with its domain in A-labels when its local part is ASCII, so that a peer
    without SMTPUTF8 can take it (RFC 6531 3.2: only the domain may be downgraded)."""
    user, domain = split_address(address)
    if not domain or address.isascii() or not user.isascii():
        return address
    try:
        return f"{user}@{domain_to_ascii(domain)}"
    except AddressError:
        return address


# ---------------------------------------------------------------------------- SMTP paths


class PathError(ValueError):
    """A MAIL FROM / RCPT TO argument that must be refused; ``reply`` says how."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Path:
    """A parsed reverse-path or forward-path: the address ("" for ``<>``) and its params."""

    address: str
    params: dict[str, str | bool]


def _fail(sender: bool, text: str, code: int = 501, status: str = "") -> PathError:
    return PathError(Reply(code, status or ("5.1.7" if sender else "5.1.3"), text))


def parse_params(text: str, sender: bool) -> dict[str, str | bool]:
    """ESMTP parameters (RFC 5321 4.1.2); names upper-cased. Raises PathError (555)."""
    params: dict[str, str | bool] = {}
    for word in text.split():
        m = _PARAM.match(word)
        if m is None:
            raise PathError(Reply(555, "5.5.4", f"Syntax error in parameter {word[:40]!r}"))
        name = m.group(1).upper()
        if name in params:
            raise PathError(Reply(555, "5.5.4", f"Parameter {name} given twice"))
        params[name] = m.group(2) if m.group(2) is not None else True
    return params


def parse_path(arg: str, *, sender: bool, postmaster_domain: str = "",
               smtputf8: bool = False) -> Path:
    """Parse ``FROM:<path> params`` / ``TO:<path> params`` (the prefix already removed).

    ``postmaster_domain`` is the domain ``RCPT TO:<Postmaster>`` (no domain) goes to;
    ``smtputf8``: the transaction's MAIL FROM had SMTPUTF8 (RFC 6531: for every path of it).
    Raises PathError with the reply to send.
    """
    text = arg.strip()
    if text.startswith("<"):
        close = text.find(">")
        if close < 0:
            raise _fail(sender, "Unbalanced '<' in address")
        raw, rest = text[1:close], text[close + 1:]
        if rest and not rest.startswith(" "):
            raise _fail(sender, "Garbage after the address")
    else:  # no brackets: accepted, as Postfix does, when it is one word
        raw, _, rest = text.partition(" ")
        if ">" in raw or "<" in raw:
            raise _fail(sender, "Unbalanced '>' in address")
    params = parse_params(rest, sender)
    smtputf8 = smtputf8 or params.get("SMTPUTF8") is True
    if len(raw.encode("utf-8", "surrogatepass")) + 2 > MAX_PATH:
        raise _fail(sender, "Address too long")
    if raw.startswith("@"):  # a source route (RFC 5321 4.1.2): accepted and ignored
        colon = raw.find(":")
        if colon < 0:
            raise _fail(sender, "Bad source route")
        raw = raw[colon + 1:]
    if raw == "":
        if sender:
            return Path("", params)
        raise _fail(sender, "The null path is not a recipient")
    if not sender and "@" not in raw and raw.lower() == "postmaster" and postmaster_domain:
        return Path(f"postmaster@{postmaster_domain}", params)
    return Path(check_mailbox(raw, sender=sender, smtputf8=smtputf8), params)


def check_mailbox(raw: str, *, sender: bool, smtputf8: bool) -> str:
    """Validate ``local@domain`` (RFC 5321 Mailbox, RFC 6531 with SMTPUTF8); returns it with
    the domain in canonical form. Raises PathError."""
    if _INVALID.search(raw):
        raise _fail(sender, "Address contains invalid characters")
    local, at, domain = raw.rpartition("@")
    if not at or not domain:
        raise _fail(sender, "Address needs a domain")
    if not local:
        raise _fail(sender, "Address needs a local part")
    if not raw.isascii() and not smtputf8:
        raise PathError(Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8"))
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise _fail(sender, "Local part longer than 64 octets")
    pattern = _DOT_ATOM_UTF8 if smtputf8 else _DOT_ATOM
    if not (pattern.match(local) or _QUOTED.match(local)):
        raise _fail(sender, "Bad local part syntax")
    try:
        canonical = normalize_domain(domain)
    except AddressError:
        raise _fail(sender, "Invalid domain", 553, "5.1.8" if sender else "5.1.3") from None
    return f"{local}@{canonical}"
