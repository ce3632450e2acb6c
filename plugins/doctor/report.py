"""What ``tampu doctor`` found: one :class:`Finding` per check, and how they are printed.

Text output is one line per check, ``ok``, ``WARN`` or ``FAIL``, followed for each WARN and
FAIL by the records to publish (zone-file syntax, ready to paste) and other things to do::

    ok    mx           example.com MX: 10 mail.example.com.
    FAIL  spf          no SPF record at example.com
          publish      example.com. IN TXT "v=spf1 mx -all"
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

Status = Literal["ok", "WARN", "FAIL"]

TXT_CHUNK: Final = 255
"""Longest character-string of a TXT record (RFC 1035 3.3.14); longer texts are split."""


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    """``mx``, ``host``, ``ptr``, ``spf``, ``spf-helo``, ``dkim``, ``dmarc``, ``mta-sts``,
    ``tls-rpt``, ``certificate``, ``domain``."""
    status: Status
    detail: str
    records: tuple[str, ...] = ()
    """Zone-file lines to publish (``example.com. IN MX 10 mail.example.com.``)."""
    notes: tuple[str, ...] = ()
    """Other things to do: who sets a PTR record, the MTA-STS policy file to serve."""

    def to_json(self) -> dict[str, object]:
        return {"check": self.check, "status": self.status, "detail": self.detail,
                "records": list(self.records), "notes": list(self.notes)}


def ok(check: str, detail: str) -> Finding:
    return Finding(check, "ok", detail)


def warn(check: str, detail: str, records: Iterable[str] = (),
         notes: Iterable[str] = ()) -> Finding:
    return Finding(check, "WARN", detail, tuple(records), tuple(notes))


def fail(check: str, detail: str, records: Iterable[str] = (),
         notes: Iterable[str] = ()) -> Finding:
    return Finding(check, "FAIL", detail, tuple(records), tuple(notes))


def quote_txt(text: str) -> str:
    """``text`` as the character-strings of a TXT record: quoted, escaped, split at 255
    bytes (``"v=spf1 mx -all"``; a long one as ``("..." "...")``)."""
    chunks: list[str] = []
    current, size = "", 0
    for char in text:  # split between characters, each string at most 255 bytes
        width = len(char.encode("utf-8"))
        if size + width > TXT_CHUNK:
            chunks.append(current)
            current, size = "", 0
        current, size = current + char, size + width
    chunks.append(current)
    strings = [f'"{_escape(c)}"' for c in chunks]
    return strings[0] if len(strings) == 1 else f"({' '.join(strings)})"


def _escape(text: str) -> str:
    """Backslash and double quote escaped, as in a zone file's character-string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def txt_record(name: str, text: str) -> str:
    """``name. IN TXT "text"``."""
    return f"{name.rstrip('.')}. IN TXT {quote_txt(text)}"


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when nothing failed (warnings allowed), 1 otherwise."""
    return 1 if any(f.status == "FAIL" for f in findings) else 0


def render_text(findings: Sequence[Finding], heading: str) -> str:
    lines = [heading]
    for f in findings:
        lines.append(f"{f.status:<5} {f.check:<12} {f.detail}")
        lines += [f"{'':<5} {'publish':<12} {record}" for record in f.records]
        lines += [f"{'':<5} {'':<12} {note}" for note in f.notes]
    failed = sum(f.status == "FAIL" for f in findings)
    warned = sum(f.status == "WARN" for f in findings)
    lines.append(f"{failed} failed, {warned} warning{'s' if warned != 1 else ''}, "
                 f"{len(findings) - failed - warned} ok")
    return "\n".join(lines) + "\n"


def render_json(findings: Sequence[Finding], domain: str, hostname: str) -> str:
    return json.dumps({"domain": domain, "hostname": hostname,
                       "ok": exit_code(findings) == 0,
                       "findings": [f.to_json() for f in findings]}, indent=2) + "\n"
