"""chasquid's domaininfo store, converted to tampu's security levels."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote, unquote_plus

from tampu.chasquid.prototext import (
    TextFormatError,
    parse_message,
)
from tampu.chasquid.schema import DOMAININFO_SCHEMA
from tampu.files import write_durably

# ---------------------------------------------------------------------------- domaininfo


@dataclass(frozen=True)
class DomainInfo:
    """One domain of chasquid's domaininfo store (levels are SEC_LEVELS names)."""

    name: str
    incoming: str = "PLAIN"
    outgoing: str = "PLAIN"


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def read_domaininfo(directory: Path | str) -> tuple[dict[str, DomainInfo], list[str]]:
    """chasquid's ``<data_dir>/domaininfo/s:<domain>`` files: (domains, problems). Files that
    are not the store's (no ``s:`` prefix, a bad escape) are skipped as chasquid skips them;
    unreadable ones are listed in problems."""
    out: dict[str, DomainInfo] = {}
    problems: list[str] = []
    directory = Path(directory)
    if not directory.is_dir():
        return out, problems
    for path in sorted(directory.iterdir()):
        if not path.name.startswith("s:") or _BAD_ESCAPE.search(path.name):
            continue
        try:
            msg = parse_message(path.read_bytes(), DOMAININFO_SCHEMA)
        except (OSError, TextFormatError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        name = msg.get("name") or unquote_plus(path.name[2:])
        out[name] = DomainInfo(name, _level_name(msg.get("incoming_sec_level", "PLAIN")),
                               _level_name(msg.get("outgoing_sec_level", "PLAIN")))
    return out, problems


def _level_name(value: str | int) -> str:
    """A level number no name has (a newer chasquid's?) is taken as PLAIN: forgotten."""
    return value if isinstance(value, str) else "PLAIN"


_TAMPU_LEVELS: Final = ("plain", "tls_unverified", "tls_verified")
_INCOMING: Final = {"PLAIN": 0, "TLS_CLIENT": 1, "TLS_INSECURE": 1, "TLS_SECURE": 1}
_OUTGOING: Final = {"PLAIN": 0, "TLS_CLIENT": 1, "TLS_INSECURE": 1, "TLS_SECURE": 2}


def tampu_domaininfo(info: DomainInfo, existing: Mapping[str, str] | None = None
                     ) -> dict[str, str]:
    """The domaininfo plugin's JSON object for ``info``: outgoing TLS_SECURE is
    ``tls_verified``, TLS_INSECURE/TLS_CLIENT ``tls_unverified``; incoming any TLS is
    ``tls_unverified`` (tampu, like chasquid, cannot verify a client). ``existing`` levels
    that are higher are kept."""
    out = {"domain": info.name.lower().rstrip(".")}
    for direction, table, level in (("incoming", _INCOMING, info.incoming),
                                    ("outgoing", _OUTGOING, info.outgoing)):
        rank = table.get(level, 0)
        known = (existing or {}).get(direction, "plain")
        if known in _TAMPU_LEVELS:
            rank = max(rank, _TAMPU_LEVELS.index(known))
        out[direction] = _TAMPU_LEVELS[rank]
    return out


def tampu_domaininfo_path(directory: Path, domain: str) -> Path:
    """Where the domaininfo plugin keeps ``domain`` (its ``store.py`` naming: the core does
    not import plugins)."""
    return directory / (quote(domain.lower().rstrip("."), safe="@-_.") + ".json")


def write_tampu_domaininfo(directory: Path, infos: Mapping[str, DomainInfo]) -> list[Path]:
    """Write (or raise) the tampu levels of ``infos`` into ``directory``; the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for info in infos.values():
        if not info.name.strip(". ") or "/" in info.name:
            continue
        path = tampu_domaininfo_path(directory, info.name)
        try:
            existing = json.loads(path.read_bytes())
        except (OSError, ValueError):
            existing = {}
        data = tampu_domaininfo(info, existing if isinstance(existing, dict) else {})
        write_durably(path, [json.dumps(data, sort_keys=True).encode() + b"\n"])
        written.append(path)
    return written


