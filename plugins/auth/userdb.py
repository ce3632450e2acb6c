"""Per-domain user databases: ``domains/<domain>/users``, one ``user:HASH`` per line.

Passwords are hashed with scrypt (memory-hard; stdlib ``hashlib.scrypt``) as
``$scrypt$ln=14,r=8,p=1$SALT$HASH`` (base64), compared in constant time. Lines starting with
``#`` and empty lines are ignored. The file is re-read when it changes. A file in chasquid's
own format (protobuf text, ``users {...}``) is read, and written back, in that format.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from tampu.chasquid import (
    from_tampu_hash,
    looks_like_users_file,
    parse_users,
    verify_tampu_hash,
    write_users,
)
from tampu.files import FileStamp, Stamp

DEFAULT_LOG_N = 14
_DUMMY_SALT = b"tampu-dummy-salt"


def hash_password(password: str, log_n: int = DEFAULT_LOG_N, r: int = 8, p: int = 1) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, log_n, r, p)
    b64 = base64.b64encode
    return f"$scrypt$ln={log_n},r={r},p={p}${b64(salt).decode()}${b64(digest).decode()}"


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=128 * r * n * 2 + 1024 * 1024, dklen=32)


def verify_password(password: str, encoded: str) -> bool:
    if encoded.startswith("$chasquid-"):  # from a chasquid users file (tampu.chasquid)
        return verify_tampu_hash(password, encoded)
    try:
        _, scheme, params, salt_b64, hash_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        opts = dict(kv.split("=") for kv in params.split(","))
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(hash_b64)
        got = _scrypt(password, salt, int(opts["ln"]), int(opts["r"]), int(opts["p"]))
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(got, expected)


def burn_time(password: str) -> None:
    """Spend the time of a real check, so unknown users cannot be told by timing."""
    _scrypt(password, _DUMMY_SALT, DEFAULT_LOG_N, 8, 1)


class UserDB:
    """One domain's users file, cached and re-read when its mtime or size changes."""

    def __init__(self, path: Path, check_interval: float = 0.0) -> None:
        self.path = path
        self._file = FileStamp(path, check_interval)
        self._stamp: Stamp | None = None
        self._loaded = False
        self._users: dict[str, str] = {}
        self._lock = threading.Lock()

    def users(self) -> dict[str, str]:
        stamp = self._file.stamp()
        with self._lock:
            if stamp != self._stamp or not self._loaded:
                self._loaded = True
                self._users = self._read() if stamp else {}
                self._stamp = stamp
            return self._users

    def _read(self) -> dict[str, str]:
        out: dict[str, str] = {}
        text = self.path.read_text(encoding="utf-8")
        if looks_like_users_file(text):  # chasquid's own format, read as it is
            return {u.lower(): e.to_tampu_hash() for u, e in parse_users(text).items()}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, encoded = line.partition(":")
            if sep:
                out[user.strip().lower()] = encoded.strip()
        return out

    def write(self, users: dict[str, str]) -> None:
        if self._chasquid_format():  # keep chasquid's format: chasquid can still read it
            entries = {u: from_tampu_hash(h) for u, h in users.items()}
            write_users(self.path, {u: e for u, e in entries.items() if e is not None})
            self._file.refresh()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        body = "# tampu users: user:scrypt-hash. Edit with `tampu user add|remove`.\n"
        body += "".join(f"{u}:{h}\n" for u, h in sorted(users.items()))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._file.refresh()

    def _chasquid_format(self) -> bool:
        try:
            return looks_like_users_file(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return False


class UserDirectory:
    """All domains' user databases under ``domains/``."""

    def __init__(self, domains_dir: Path, check_interval: float = 0.0) -> None:
        self.domains_dir = domains_dir
        self.check_interval = check_interval
        self._dbs: dict[str, UserDB] = {}

    def db(self, domain: str) -> UserDB:
        domain = domain.lower()
        found = self._dbs.get(domain)
        if found is None:
            found = self._dbs[domain] = UserDB(self.domains_dir / domain / "users",
                                               self.check_interval)
        return found

    def lookup(self, user: str, domain: str) -> str | None:
        return self.db(domain).users().get(user.lower())

    def exists(self, user: str, domain: str) -> bool:
        return self.lookup(user, domain) is not None
