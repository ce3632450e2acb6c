"""``chasquid.conf``: read with chasquid's defaults, and turned into a tampu conf.d."""

from __future__ import annotations

import re
import socket
from collections.abc import Collection
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from tampu.chasquid.prototext import (
    TextFormatError,
    parse_message,
)
from tampu.chasquid.schema import CONFIG_SCHEMA, ChasquidError

# ---------------------------------------------------------------------------- chasquid.conf

_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                        "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` (``"20h"``, ``"1h30m"``, ``"1.5h"``, ``"-5m"``, ``"0"``) in
    seconds. Raises ValueError."""
    s = text
    sign = 1.0
    if s[:1] in ("-", "+"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}"
                             + ("" if m is None or m.group(1) else ": number missing"))
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return sign * total


@dataclass(frozen=True)
class ChasquidConfig:
    """``chasquid.conf`` with chasquid's defaults filled in, as ``config.Load`` does: a field
    at its zero value (``""``, ``0``, ``false``, no entries) means "not set", except
    ``suffix_separators`` and ``drop_characters``, which may be set to ``""``. ``explicit``
    names the fields the file set. An unset ``hostname`` is the system's (os.Hostname)."""

    hostname: str = ""
    max_data_size_mb: int = 50
    smtp_address: tuple[str, ...] = ("systemd",)
    submission_address: tuple[str, ...] = ("systemd",)
    submission_over_tls_address: tuple[str, ...] = ("systemd",)
    monitoring_address: str = ""
    mail_delivery_agent_bin: str = "maildrop"
    mail_delivery_agent_args: tuple[str, ...] = ("-f", "%from%", "-d", "%to_user%")
    data_dir: str = "/var/lib/chasquid"
    suffix_separators: str = "+"
    drop_characters: str = "."
    mail_log_path: str = "<syslog>"
    dovecot_auth: bool = False
    dovecot_userdb_path: str = ""
    dovecot_client_path: str = ""
    haproxy_incoming: bool = False
    max_queue_items: int = 200
    give_up_send_after: str = "20h"
    explicit: frozenset[str] = frozenset()

    @property
    def give_up_seconds(self) -> float:
        return parse_duration(self.give_up_send_after)


CONFIG_FIELDS: Final = tuple(f.name for f in fields(ChasquidConfig) if f.name != "explicit")
assert set(CONFIG_FIELDS) == set(CONFIG_SCHEMA)


def parse_config(text: str | bytes, *, system_hostname: str | None = None) -> ChasquidConfig:
    """``chasquid.conf``'s text as chasquid loads it. Raises TextFormatError (syntax, unknown
    field) or ChasquidError (a value chasquid refuses: a bad ``give_up_send_after``)."""
    values = parse_message(text, CONFIG_SCHEMA)
    changes: dict[str, Any] = {}
    for name, value in values.items():
        spec = CONFIG_SCHEMA[name]
        if spec.optional:
            changes[name] = value
        elif spec.repeated:
            if value:
                changes[name] = tuple(value)
        elif name == "max_data_size_mb" or name == "max_queue_items":
            if value > 0:
                changes[name] = value
        elif value:  # chasquid's override(): zero values do not override the defaults
            changes[name] = value
    cfg = replace(ChasquidConfig(), **changes, explicit=frozenset(changes))
    if not cfg.hostname:
        cfg = replace(cfg, hostname=system_hostname or socket.gethostname())
    try:
        parse_duration(cfg.give_up_send_after)
    except ValueError as exc:
        raise ChasquidError(f"give_up_send_after: {exc}") from None
    return cfg


def read_config(path: Path | str) -> ChasquidConfig:
    """Read ``chasquid.conf`` (see :func:`parse_config`); errors name the file and line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return parse_config(data)
    except TextFormatError as exc:
        raise TextFormatError(f"{path}: {exc.message}", exc.line) from None
    except ChasquidError as exc:
        raise ChasquidError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------- to conf.d

ConfdResult = tuple[dict[str, str], list[str], list[tuple[str, str]]]


def to_confd(cfg: ChasquidConfig, config_dir: Path | str, *,
             target_dir: Path | str | None = None,
             available_plugins: Collection[str] | None = None) -> ConfdResult:
    """An equivalent tampu conf.d: ``(files, mapped, unmapped)``.

    ``files`` maps conf.d file names to TOML text that :func:`tampu.config.load_config` takes
    as it is; ``mapped`` says, one line per chasquid.conf field (``field -> tampu key``), where
    each went; ``unmapped`` lists ``(field, why)`` for what tampu cannot do. ``config_dir`` is
    the chasquid directory (chasquid's relative paths are relative to it); ``target_dir`` is
    where the conf.d goes (default: the same directory), relative paths are made absolute when
    it differs. ``available_plugins``: plugin names installed (default: the entry points).
    Implemented in :mod:`tampu.chasquid.confd`.
    """
    from tampu.chasquid.confd import to_confd as impl

    return impl(cfg, Path(config_dir), target_dir=None if target_dir is None else
                Path(target_dir), available_plugins=available_plugins)


def confd_for_chasquid_dir(config_dir: Path | str) -> dict[str, str] | None:
    """For the loader: the conf.d texts of an unchanged chasquid directory (one with a
    ``chasquid.conf`` and no ``conf.d/``), or None when it is not one. Raises
    TextFormatError / ChasquidError (with the file and line) for a broken chasquid.conf."""
    root = Path(config_dir)
    conf = root / "chasquid.conf"
    if (root / "conf.d").exists() or not conf.is_file():
        return None
    return to_confd(read_config(conf), root)[0]

