"""Authentication results (RFC 8601): what SPF, DKIM, DMARC and other checks concluded.

Checking plugins record one :class:`MethodResult` per check on the transaction's envelope::

    add_result(envelope, MethodResult("dkim", "pass", (("header.d", "example.com"),
                                                       ("header.s", "sel1"))))

and read the others' (DMARC reads SPF and DKIM) with :func:`results`. The core writes them
all into **one** ``Authentication-Results`` header with the server's authserv-id (its
hostname), after removing any header that claims that authserv-id (RFC 8601 section 5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tampu.envelope import Envelope, StashKey

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~/@=]+$")


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One ``method=result`` of an Authentication-Results header."""

    method: str
    """``spf``, ``dkim``, ``dmarc``, ``auth``, ``iprev`` ..."""
    result: str
    """``pass``, ``fail``, ``softfail``, ``neutral``, ``none``, ``temperror``, ``permerror``..."""
    props: tuple[tuple[str, str], ...] = ()
    """``(ptype.property, value)`` pairs: ``("smtp.mailfrom", "a@b")``, ``("header.d", "b")``."""
    reason: str = ""
    comment: str = ""
    _text: str = field(default="", init=False, repr=False, compare=False)
    """The header text, made once (a result is written several times per message)."""

    def prop(self, name: str) -> str | None:
        for key, value in self.props:
            if key == name:
                return value
        return None

    def __str__(self) -> str:
        if not self._text:
            object.__setattr__(self, "_text", self._format())
        return self._text

    def _format(self) -> str:
        out = f"{self.method}={self.result}"
        if self.comment:
            out += f" ({_comment(self.comment)})"
        if self.reason:
            out += f' reason="{_quoted(self.reason)}"'
        for key, value in self.props:
            out += f" {key}={value if _TOKEN.match(value) else chr(34) + _quoted(value) + chr(34)}"
        return out


AUTH_RESULTS: StashKey[list[MethodResult]] = StashKey()


def add_result(envelope: Envelope, result: MethodResult) -> None:
    """Record a result for this transaction (it goes into the Authentication-Results header)."""
    envelope.stash.setdefault(AUTH_RESULTS, []).append(result)


def results(envelope: Envelope, method: str | None = None) -> list[MethodResult]:
    """The results recorded so far, all or those of one method, in the order they came."""
    found = envelope.stash.get(AUTH_RESULTS, [])
    return [r for r in found if method is None or r.method == method]


def header_value(authserv_id: str, found: list[MethodResult]) -> str:
    """The value of one Authentication-Results header (``authserv-id; none`` if empty)."""
    if not found:
        return f"{authserv_id}; none"
    return f"{authserv_id};" + ";".join(f"\r\n\t{r}" for r in found)


def strip_own(message: bytes, authserv_id: str) -> bytes:
    """``message`` without the Authentication-Results headers that claim to come from
    ``authserv_id`` (RFC 8601 5: only this server may say what this server checked)."""
    end = message.find(b"\r\n\r\n")
    head = message[: end + 2] if end >= 0 else message
    if b"authentication-results" not in head.lower():
        return message
    own = authserv_id.lower().encode()
    blocks: list[list[bytes]] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and blocks:
            blocks[-1].append(line)
        else:
            blocks.append([line])
    kept = []
    for block in blocks:
        name, colon, value = b"".join(block).partition(b":")
        if colon and name.strip().lower() == b"authentication-results" and \
                _authserv_id(value) == own:
            continue
        kept.extend(block)
    return b"".join(kept) + (message[end + 2:] if end >= 0 else b"")


def _authserv_id(value: bytes) -> bytes:
    text = re.sub(rb"\([^)]*\)", b"", value)  # comments (not nested: enough for an id)
    return text.split(b";", 1)[0].strip().lower()


_NOT_IN_COMMENT = str.maketrans("", "", "()\\")
_NOT_IN_QUOTED = str.maketrans("", "", '"\\')


def _comment(text: str) -> str:
    if text.isprintable():
        return text.translate(_NOT_IN_COMMENT)[:200]
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:200]


def _quoted(text: str) -> str:
    if text.isprintable():
        return text.translate(_NOT_IN_QUOTED)[:200]
    return "".join(c for c in text if c.isprintable() and c not in '"\\')[:200]
