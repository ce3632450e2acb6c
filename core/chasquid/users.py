"""chasquid's users databases (``domains/<domain>/users``), read and written as they are."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from tampu.chasquid.prototext import parse_message
from tampu.chasquid.prototext_format import format_message
from tampu.chasquid.schema import USERDB_SCHEMA
from tampu.files import write_durably

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


