"""DMARC policy records (RFC 7489 section 6.3 and 6.4): ``v=DMARC1; p=reject; ...``.

:func:`parse_record` turns the text of one ``_dmarc`` TXT record into a :class:`DmarcRecord`
or raises :class:`RecordError`. The rules, and where the RFC leaves room, the choices:

* the record must begin with the tag ``v`` whose value is exactly ``DMARC1`` (the ABNF spells
  the value with ``%x`` octets: case-sensitive); tag names and keyword values (``reject``,
  ``s``) are case-insensitive (quoted strings in the ABNF);
* the tag-list follows DKIM's syntax (RFC 6376 3.2): ``name = value`` pairs separated by
  ``;``. A pair without ``=``, a bad tag name or a tag given twice makes the whole record
  invalid, as in DKIM; empty pairs (``;;``, a trailing ``;``) are allowed;
* unknown tags are ignored (6.3);
* a missing or invalid ``p``, or an invalid ``sp``: if ``rua`` holds at least one
  syntactically valid URI, the record counts as ``p=none`` (6.6.3 step 6, ``fallback``);
  otherwise it is invalid;
* an invalid value of another known tag (``pct=150``, ``adkim=x``, ``ri=-1``) is ignored and
  the tag's default used, with a note in ``warnings``: the domain's policy still applies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal, cast

Policy = Literal["none", "quarantine", "reject"]
Alignment = Literal["r", "s"]

POLICIES: Final[tuple[Policy, ...]] = ("none", "quarantine", "reject")
DEFAULT_RI: Final = 86400
MAX_RI: Final = 2**32 - 1

_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_VALUE = re.compile(r"^[^\x00-\x1f\x7f;]*$")
_WSP = " \t\r\n"
_VERSION = re.compile(r"^[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(;|$)")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s,!]+$")
_SIZE = re.compile(r"^([0-9]+)([kmgtKMGT]?)$")
_KEYWORD = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
_UNITS: Final = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_FO: Final = ("0", "1", "d", "s")


class RecordError(ValueError):
    """A TXT record that is not a usable DMARC record (DMARC ``permerror``)."""


@dataclass(frozen=True, slots=True)
class ReportUri:
    """One ``rua``/``ruf`` destination: ``mailto:dmarc@example.com!10m``."""

    uri: str
    max_size: int | None = None
    """The size limit in octets (``!10m``), or None."""


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed DMARC record. Only ``p``, ``sp``, ``pct``, ``adkim`` and ``aspf`` affect
    evaluation; the reporting tags are parsed and kept (reports are not sent yet)."""

    p: Policy
    sp: Policy
    """The subdomain policy: ``sp=`` or, when absent, ``p``."""
    sp_explicit: bool = False
    """The record has its own ``sp`` tag."""
    pct: int = 100
    adkim: Alignment = "r"
    aspf: Alignment = "r"
    rua: tuple[ReportUri, ...] = ()
    ruf: tuple[ReportUri, ...] = ()
    fo: tuple[str, ...] = ("0",)
    rf: tuple[str, ...] = ("afrf",)
    ri: int = DEFAULT_RI
    fallback: bool = False
    """``p``/``sp`` was missing or invalid and a valid ``rua`` made it ``p=none`` (6.6.3)."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """Values that were ignored for their default."""

    def policy_for(self, subdomain: bool) -> Policy:
        """``sp`` for a subdomain of the domain the record was found at, else ``p``."""
        return self.sp if subdomain else self.p


def is_dmarc_record(text: str) -> bool:
    """Whether a TXT record starts with ``v=DMARC1`` (others are discarded, 6.6.3 step 3)."""
    return _VERSION.match(text) is not None


def parse_tags(text: str) -> list[tuple[str, str]]:
    """A DKIM-style tag-list: ``[(name lower-cased, value stripped)]``. Raises RecordError."""
    tags: list[tuple[str, str]] = []
    seen: set[str] = set()
    for spec in text.split(";"):
        if not spec.strip(_WSP):
            continue
        name, eq, value = spec.partition("=")
        name, value = name.strip(_WSP), value.strip(_WSP)
        if not eq or not _TAG_NAME.match(name) or not _VALUE.match(value):
            raise RecordError(f"malformed tag {spec.strip(_WSP)[:40]!r}")
        lname = name.lower()
        if lname in seen:
            raise RecordError(f"tag {lname}= given twice")
        seen.add(lname)
        tags.append((lname, value))
    return tags


def parse_record(text: str) -> DmarcRecord:
    """Parse one DMARC TXT record (its strings already joined). Raises RecordError."""
    if not is_dmarc_record(text):
        raise RecordError("not a DMARC record (does not start with v=DMARC1)")
    tags = parse_tags(text)
    values = dict(tags)
    warnings: list[str] = []
    rua = _uris(values.get("rua"), "rua", warnings)
    ruf = _uris(values.get("ruf"), "ruf", warnings)
    p = _policy(values.get("p"))
    sp = _policy(values["sp"]) if "sp" in values else p
    fallback = False
    if p is None or sp is None:
        what = "sp" if p is not None else "p"
        if not rua:
            shown = values.get(what)
            raise RecordError(f"missing {what}=" if shown is None
                              else f"invalid {what}={shown[:20]}")
        warnings.append(f"invalid or missing {what}=: treated as p=none (RFC 7489 6.6.3)")
        p = sp = "none"
        fallback = True
    return DmarcRecord(
        p=p, sp=sp, sp_explicit="sp" in values and not fallback,
        pct=_number(values.get("pct"), "pct", 0, 100, 100, warnings),
        adkim=_alignment(values.get("adkim"), "adkim", warnings),
        aspf=_alignment(values.get("aspf"), "aspf", warnings),
        rua=rua, ruf=ruf,
        fo=_list(values.get("fo"), "fo", ":", lambda t: t.lower() in _FO, ("0",), warnings),
        rf=_list(values.get("rf"), "rf", ":", lambda t: _KEYWORD.match(t) is not None,
                 ("afrf",), warnings),
        ri=_number(values.get("ri"), "ri", 0, MAX_RI, DEFAULT_RI, warnings),
        fallback=fallback, warnings=tuple(warnings),
    )


def _keyword(value: str) -> str | None:
    """A case-insensitive ASCII keyword (``"K"`` is no ``k``: no Unicode case folding)."""
    return value.lower() if value.isascii() else None


def _policy(value: str | None) -> Policy | None:
    if value is None:
        return None
    word = _keyword(value)
    return cast(Policy, word) if word in POLICIES else None


def _alignment(value: str | None, tag: str, warnings: list[str]) -> Alignment:
    if value is None:
        return "r"
    word = _keyword(value)
    if word in ("r", "s"):
        return cast(Alignment, word)
    warnings.append(f"invalid {tag}={value[:20]}: relaxed used")
    return "r"


def _number(value: str | None, tag: str, low: int, high: int, default: int,
            warnings: list[str]) -> int:
    if value is None:
        return default
    if value.isascii() and value.isdigit() and low <= int(value) <= high:
        return int(value)
    warnings.append(f"invalid {tag}={value[:20]}: {default} used")
    return default


def _list(value: str | None, tag: str, sep: str, valid: Callable[[str], bool],
          default: tuple[str, ...], warnings: list[str]) -> tuple[str, ...]:
    if value is None:
        return default
    tokens = [t.strip(_WSP) for t in value.split(sep)]
    good = tuple(t.lower() for t in tokens if t.isascii() and valid(t))
    if len(good) != len(tokens):
        warnings.append(f"invalid entries in {tag}={value[:40]} ignored")
    return good or default


def _uris(value: str | None, tag: str, warnings: list[str]) -> tuple[ReportUri, ...]:
    """``dmarc-uri *(*WSP "," *WSP dmarc-uri)``; invalid entries are dropped."""
    if value is None:
        return ()
    out: list[ReportUri] = []
    for raw in value.split(","):
        entry = raw.strip(_WSP)
        uri, bang, size = entry.rpartition("!")
        if not bang:
            uri, size = entry, ""
        limit: int | None = None
        if bang:
            match = _SIZE.match(size)
            if match is None:
                warnings.append(f"invalid size in {tag} entry {entry[:40]!r} ignored")
                continue
            limit = int(match.group(1)) * _UNITS[match.group(2).lower()]
        if not _URI.match(uri):
            warnings.append(f"invalid {tag} URI {entry[:40]!r} ignored")
            continue
        out.append(ReportUri(uri, limit))
    return tuple(out)
