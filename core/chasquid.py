"""chasquid's own files, read as they are: the users databases, ``chasquid.conf`` and the
domaininfo store; and ``chasquid.conf`` turned into an equivalent tampu conf.d.

All three are protocol-buffer *text format* (:mod:`tampu._prototext`), with the schemas of
chasquid's ``userdb.proto``, ``config.proto`` and ``domaininfo.proto`` (chasquid 1.11 as
packaged by Debian, plus the fields added up to 1.18: ``Denied`` users, ``max_queue_items``,
``give_up_send_after``).

* ``domains/<domain>/users``: a ``ProtoDB`` with a ``users`` map, user -> ``Password``, whose
  scheme is ``scrypt {logN r p keyLen salt encrypted}``, ``plain {password}`` or
  ``denied {}`` (a receive-only user: exists for RCPT TO, never authenticates)::

      users: {
        key: "jose"
        value: {
          scrypt: {
            logN: 14
            r: 8
            p: 1
            keyLen: 32
            salt: "\\xfeo`\\x02{wv6..."
            encrypted: "Re\\xc9\\t..."
          }
        }
      }

* ``<data_dir>/domaininfo/s:<url.QueryEscape(domain)>``: one ``Domain`` per file,
  ``name: "example.com"  incoming_sec_level: TLS_CLIENT  outgoing_sec_level: TLS_SECURE``
  (PLAIN, the zero value, is not written).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, unquote_plus

from tampu._prototext import (
    FieldSpec,
    MessageSpec,
    TextFormatError,
    format_message,
    format_text,
    parse_message,
    parse_text,
)
from tampu.errors import TampuError
from tampu.files import write_durably

__all__ = [
    "CONFIG_SCHEMA",
    "DOMAININFO_SCHEMA",
    "USERDB_SCHEMA",
    "ChasquidConfig",
    "ChasquidError",
    "DomainInfo",
    "TextFormatError",
    "UserEntry",
    "confd_for_chasquid_dir",
    "format_text",
    "format_users",
    "from_tampu_hash",
    "looks_like_users_file",
    "parse_config",
    "parse_duration",
    "parse_message",
    "parse_text",
    "parse_users",
    "read_config",
    "read_domaininfo",
    "read_users",
    "tampu_domaininfo",
    "tampu_domaininfo_path",
    "to_confd",
    "verify_tampu_hash",
    "write_tampu_domaininfo",
    "write_users",
]


class ChasquidError(TampuError, ValueError):
    """A chasquid file is valid text format but not something chasquid would accept."""


# ---------------------------------------------------------------------------- schemas

_SCRYPT: MessageSpec = {
    "logN": FieldSpec(1, "uint64"), "r": FieldSpec(2, "int32"), "p": FieldSpec(3, "int32"),
    "keyLen": FieldSpec(4, "int32"), "salt": FieldSpec(5, "bytes"),
    "encrypted": FieldSpec(6, "bytes"),
}
_PASSWORD: MessageSpec = {
    "scrypt": FieldSpec(2, "message", message=_SCRYPT, oneof="scheme"),
    "plain": FieldSpec(3, "message", message={"password": FieldSpec(1, "bytes")},
                       oneof="scheme"),
    "denied": FieldSpec(4, "message", message={}, oneof="scheme"),
}
USERDB_SCHEMA: Final[MessageSpec] = {
    "users": FieldSpec(1, "map", message={"key": FieldSpec(1, "string"),
                                          "value": FieldSpec(2, "message", message=_PASSWORD)}),
}
"""chasquid's ``userdb.proto`` (``ProtoDB``)."""

CONFIG_SCHEMA: Final[MessageSpec] = {
    "hostname": FieldSpec(1, "string"),
    "max_data_size_mb": FieldSpec(2, "int64"),
    "smtp_address": FieldSpec(3, "string", repeated=True),
    "submission_address": FieldSpec(4, "string", repeated=True),
    "submission_over_tls_address": FieldSpec(5, "string", repeated=True),
    "monitoring_address": FieldSpec(6, "string"),
    "mail_delivery_agent_bin": FieldSpec(7, "string"),
    "mail_delivery_agent_args": FieldSpec(8, "string", repeated=True),
    "data_dir": FieldSpec(9, "string"),
    "suffix_separators": FieldSpec(10, "string", optional=True),
    "drop_characters": FieldSpec(11, "string", optional=True),
    "mail_log_path": FieldSpec(12, "string"),
    "dovecot_auth": FieldSpec(13, "bool"),
    "dovecot_userdb_path": FieldSpec(14, "string"),
    "dovecot_client_path": FieldSpec(15, "string"),
    "haproxy_incoming": FieldSpec(16, "bool"),
    "max_queue_items": FieldSpec(17, "uint32"),
    "give_up_send_after": FieldSpec(18, "string"),
}
"""chasquid's ``config.proto`` (``Config``): fields 1-16 are 1.11's, 17-18 came in 1.16."""

SEC_LEVELS: Final = ("PLAIN", "TLS_CLIENT", "TLS_INSECURE", "TLS_SECURE")
DOMAININFO_SCHEMA: Final[MessageSpec] = {
    "name": FieldSpec(1, "string"),
    "incoming_sec_level": FieldSpec(2, "enum", enum=SEC_LEVELS),
    "outgoing_sec_level": FieldSpec(3, "enum", enum=SEC_LEVELS),
}
"""chasquid's ``domaininfo.proto`` (``Domain``)."""

# ---------------------------------------------------------------------------- users

MAX_LOG_N: Final = 20
"""Largest scrypt cost verified (1 GiB of memory at r=8; more memory is never tried either);
above it a check fails. chasquid-util writes logN=14, r=8 (16 MiB)."""

Scheme = Literal["scrypt", "plain", "denied", "none"]


@dataclass(frozen=True)
class UserEntry:
    """One user of a chasquid users file.

    ``scheme`` is ``scrypt``, ``plain``, ``denied`` (receive-only: ``user-add
    --receive_only``) or ``none`` (an entry without a scheme, which chasquid also never
    authenticates).
    """

    scheme: Scheme
    log_n: int = 0
    r: int = 0
    p: int = 0
    key_len: int = 0
    salt: bytes = field(default=b"", repr=False)
    encrypted: bytes = field(default=b"", repr=False)
    password: bytes = field(default=b"", repr=False)

    @property
    def receive_only(self) -> bool:
        """The user exists (mail is accepted for it) but cannot authenticate."""
        return self.scheme in ("denied", "none")

    @classmethod
    def new_scrypt(cls, password: str, *, log_n: int = 14, r: int = 8, p: int = 1,
                   key_len: int = 32, salt: bytes | None = None) -> UserEntry:
        """A new scrypt entry, with chasquid-util's parameters and a 16-byte random salt."""
        salt = secrets.token_bytes(16) if salt is None else salt
        digest = _scrypt(_password_bytes(password), salt, log_n, r, p, key_len)
        if digest is None:
            raise ValueError(f"unusable scrypt parameters logN={log_n} r={r} p={p} "
                             f"keyLen={key_len}")
        return cls("scrypt", log_n, r, p, key_len, salt, digest)

    @classmethod
    def new_plain(cls, password: str) -> UserEntry:
        """A plain-text entry (chasquid reads them, "for debugging"; never use in production)."""
        return cls("plain", password=_password_bytes(password))

    @classmethod
    def new_denied(cls) -> UserEntry:
        return cls("denied")

    def verify(self, password: str) -> bool:
        """chasquid's ``PasswordMatches``, compared in constant time."""
        if self.scheme == "scrypt":
            got = _scrypt(_password_bytes(password), self.salt, self.log_n, self.r, self.p,
                          self.key_len)
            return got is not None and hmac.compare_digest(got, self.encrypted)
        if self.scheme == "plain":
            return hmac.compare_digest(_password_bytes(password), self.password)
        return False

    def to_message(self) -> dict[str, Any]:
        if self.scheme == "scrypt":
            return {"scrypt": {"logN": self.log_n, "r": self.r, "p": self.p,
                               "keyLen": self.key_len, "salt": self.salt,
                               "encrypted": self.encrypted}}
        if self.scheme == "plain":
            return {"plain": {"password": self.password}}
        if self.scheme == "denied":
            return {"denied": {}}
        return {}

    @classmethod
    def from_message(cls, value: Mapping[str, Any]) -> UserEntry:
        if "scrypt" in value:
            s = value["scrypt"]
            return cls("scrypt", s.get("logN", 0), s.get("r", 0), s.get("p", 0),
                       s.get("keyLen", 0), s.get("salt", b""), s.get("encrypted", b""))
        if "plain" in value:
            return cls("plain", password=value["plain"].get("password", b""))
        return cls("denied" if "denied" in value else "none")

    def to_tampu_hash(self) -> str:
        """The entry as a string for tampu's users tables (``plugins/auth/userdb.py``):
        ``$scrypt$...`` (tampu's own encoding) for chasquid's usual 32-byte keys, else
        ``$chasquid-...$`` (checked by :func:`verify_tampu_hash`); ``!receive-only`` for an
        entry that can never authenticate."""
        b64 = _b64
        if self.scheme == "scrypt" and self.key_len == len(self.encrypted) == 32:
            return (f"$scrypt$ln={self.log_n},r={self.r},p={self.p}$"
                    f"{b64(self.salt)}${b64(self.encrypted)}")
        if self.scheme == "scrypt":
            return (f"$chasquid-scrypt$ln={self.log_n},r={self.r},p={self.p},"
                    f"len={self.key_len}${b64(self.salt)}${b64(self.encrypted)}")
        if self.scheme == "plain":
            return f"$chasquid-plain${b64(self.password)}"
        return "!receive-only"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _password_bytes(password: str) -> bytes:
    # Go hashes the raw bytes of the string: keep bytes that were not valid UTF-8 as they came
    return password.encode("utf-8", "surrogateescape")


def _scrypt(password: bytes, salt: bytes, log_n: int, r: int, p: int,
            key_len: int) -> bytes | None:
    """Go's ``scrypt.Key``; None for parameters it refuses (or too costly to try)."""
    if not 1 <= log_n <= MAX_LOG_N or r < 1 or p < 1 or r * p >= 1 << 30 \
            or not 1 <= key_len <= 1024:
        return None
    n = 1 << log_n
    if 128 * r * n > 1 << 30:  # over 1 GiB of memory: not from chasquid-util (16 MiB)
        return None
    try:
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=key_len,
                              maxmem=128 * r * (n + p + 2) + 1024 * 1024)
    except (ValueError, MemoryError):
        return None


def from_tampu_hash(encoded: str) -> UserEntry | None:
    """Back from :meth:`UserEntry.to_tampu_hash` (also tampu's own ``$scrypt$`` hashes, so a
    tampu users table can be written in chasquid's format); None if not one of those."""
    if encoded == "!receive-only":
        return UserEntry("denied")
    parts = encoded.split("$")
    try:
        if len(parts) == 3 and parts[1] == "chasquid-plain":
            return UserEntry("plain", password=base64.b64decode(parts[2], validate=True))
        if len(parts) != 5 or parts[1] not in ("scrypt", "chasquid-scrypt"):
            return None
        opts = dict(kv.split("=", 1) for kv in parts[2].split(","))
        digest = base64.b64decode(parts[4], validate=True)
        return UserEntry("scrypt", int(opts["ln"]), int(opts["r"]), int(opts["p"]),
                         int(opts.get("len", len(digest))),
                         base64.b64decode(parts[3], validate=True), digest)
    except (ValueError, KeyError, binascii.Error):
        return None


def verify_tampu_hash(password: str, encoded: str) -> bool:
    """Check ``password`` against a ``$chasquid-...$`` string of :meth:`to_tampu_hash`."""
    entry = from_tampu_hash(encoded)
    return entry is not None and entry.verify(password)


_FIRST_CODE_LINE = re.compile(r"^[ \t]*(?:#[^\n]*)?$")


def looks_like_users_file(text: str) -> bool:
    """True for chasquid's format: the first line that is not blank or a comment starts with
    the field ``users`` and a message (``users {``, ``users: {``, ``users <``, ``users: [``),
    or has only ``users``/``users:`` (the brace on the next line). tampu's format never does:
    its user ``users`` is ``users:$scrypt$...``."""
    for line in text.splitlines():
        if _FIRST_CODE_LINE.match(line):
            continue
        return re.match(r"[ \t]*users[ \t]*(?::[ \t]*)?(?:[{<\[]|#|$)", line) is not None
    return False


def parse_users(text: str | bytes) -> dict[str, UserEntry]:
    """The users of a chasquid users file's text. Raises TextFormatError."""
    tree = parse_message(text, USERDB_SCHEMA)
    return {name: UserEntry.from_message(value)
            for name, value in tree.get("users", {}).items()}


def read_users(path: Path | str) -> dict[str, UserEntry]:
    """Read ``domains/<domain>/users``; a missing file is an empty database (as in chasquid).
    Raises TextFormatError (with the line) for a file chasquid would not load either."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {}
    return parse_users(data)


def format_users(entries: Mapping[str, UserEntry]) -> str:
    """chasquid's text for ``entries`` (as ``chasquid-util`` writes it, sorted by user)."""
    return format_message({"users": {name: e.to_message() for name, e in entries.items()}},
                          USERDB_SCHEMA)


def write_users(path: Path | str, entries: Mapping[str, UserEntry]) -> None:
    """Write a users file chasquid reads: atomically, mode 0660 as chasquid-util does (or the
    mode of the file it replaces)."""
    path = Path(path)
    for name in entries:
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"user {name!r}: chasquid users are non-empty, without spaces")
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o660
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, [format_users(entries).encode("utf-8")])
    os.chmod(path, mode)


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
    Implemented in :mod:`tampu._chasquid_confd`.
    """
    from tampu._chasquid_confd import to_confd as impl

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
