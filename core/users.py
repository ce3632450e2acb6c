"""The one user directory: local domains, their folders and their users.

* :class:`Domains` owns the set of local domains: ``[server] local_domains`` plus every folder
  of ``domains/`` (``xn--`` or Unicode spellings alike), all in canonical form
  (:func:`tampu.addresses.normalize_domain`), and which folder holds a domain's files.
* :class:`UserDirectory` reads ``domains/<domain>/users`` (tampu's ``user:$scrypt$...`` lines,
  or chasquid's protobuf text format), re-reading a file when it changes, and answers the
  questions the plugins ask: does this address belong to a user (``exists``, with suffix and
  drop characters removed), and do these credentials authenticate (``authenticate``).
  Other user sources (Dovecot) register with :meth:`UserDirectory.add_source`.

Passwords are hashed with scrypt (``$scrypt$ln=14,r=8,p=1$SALT$HASH``), compared in
constant time; an unknown user costs the time of a real check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from tampu.addresses import AddressError, lookup_key, normalize_domain, normalize_user
from tampu.files import FileStamp, Stamp, write_durably

log = logging.getLogger("tampu.users")

DEFAULT_LOG_N = 14
_DUMMY_SALT = b"tampu-dummy-salt"
TAMPU_HEADER = "# tampu users: user:scrypt-hash. Edit with `tampu user add|remove`.\n"
RECEIVE_ONLY = "!receive-only"
"""The secret of a user that receives mail but cannot authenticate (chasquid's denied)."""

Format = Literal["tampu", "chasquid"]


# ---------------------------------------------------------------------------- passwords


def hash_password(password: str, log_n: int = DEFAULT_LOG_N, r: int = 8, p: int = 1) -> str:
    salt = secrets.token_bytes(16)
    digest = scrypt(password, salt, log_n, r, p)
    b64 = base64.b64encode
    return f"$scrypt$ln={log_n},r={r},p={p}${b64(salt).decode()}${b64(digest).decode()}"


def scrypt(password: str, salt: bytes, log_n: int, r: int, p: int, dklen: int = 32) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=128 * r * n * 2 + 1024 * 1024, dklen=dklen)


def verify_password(password: str, encoded: str) -> bool:
    try:
        _, scheme, params, salt_b64, hash_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        opts = dict(kv.split("=") for kv in params.split(","))
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(hash_b64)
        got = scrypt(password, salt, int(opts["ln"]), int(opts["r"]), int(opts["p"]),
                     len(expected))
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(got, expected)


def burn_time(password: str) -> None:
    """Spend the time of a real check, so unknown users cannot be told by timing."""
    scrypt(password, _DUMMY_SALT, DEFAULT_LOG_N, 8, 1)


# ---------------------------------------------------------------------------- domains


class Domains:
    """The local domains and the folder of each under ``domains/`` (re-read on change)."""

    def __init__(self, domains_dir: Path, configured: list[str], check_interval: float) -> None:
        self.dir = domains_dir
        self.configured = frozenset(normalize_domain(d) for d in configured)
        self._stamp = FileStamp(domains_dir, check_interval)
        self._seen: Stamp | None = None
        self._folders: dict[str, Path] = {}
        self._all: frozenset[str] = self.configured
        self._loaded = False
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        stamp = self._stamp.stamp()
        if self._loaded and stamp == self._seen:
            return
        with self._lock:
            folders: dict[str, Path] = {}
            if stamp is not None:
                for sub in sorted(self.dir.iterdir()):
                    if not sub.is_dir() or sub.name.startswith("."):
                        continue
                    try:
                        folders.setdefault(normalize_domain(sub.name), sub)
                    except AddressError:
                        log.warning("%s: not a domain name; ignored", sub)
            self._folders, self._seen, self._loaded = folders, stamp, True
            self._all = self.configured | frozenset(folders)

    def refresh(self) -> None:
        """Look at ``domains/`` again now (after this process created a folder)."""
        self._stamp.refresh()
        self._refresh()

    def all(self) -> frozenset[str]:
        self._refresh()
        return self._all

    def canonical(self, domain: str) -> str | None:
        """The canonical form of ``domain``, or None when it is not a valid domain."""
        try:
            return normalize_domain(domain)
        except AddressError:
            return None

    def is_local(self, domain: str) -> bool:
        canonical = self.canonical(domain) if domain else None
        return canonical is not None and canonical in self.all()

    def folder(self, domain: str) -> Path:
        """The folder of ``domain``'s files (existing spelling, else the canonical name)."""
        canonical = normalize_domain(domain)
        self._refresh()
        return self._folders.get(canonical) or self.dir / canonical


# ---------------------------------------------------------------------------- users


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One user of a users file."""

    user: str
    """As written in the file (case-mapped)."""
    secret: str
    """tampu's ``$scrypt$...`` string."""
    receive_only: bool = False
    """chasquid's denied entries: the address receives mail but cannot authenticate."""

    def verify(self, password: str) -> bool:
        if self.receive_only:
            burn_time(password)
            return False
        if self.secret.startswith("$chasquid-"):  # a form only chasquid's files have
            from tampu.chasquid import verify_tampu_hash

            return verify_tampu_hash(password, self.secret)
        return verify_password(password, self.secret)


@dataclass
class UsersFile:
    """One domain's users file, re-read when it changes. Raises UsersFileError on bad lines."""

    path: Path
    check_interval: float = 0.0
    separators: str = "+"
    drop: str = "."
    _stamp: FileStamp | None = None
    _seen: Stamp | None = None
    _loaded: bool = False
    format: Format = "tampu"
    records: dict[str, UserRecord] = field(default_factory=dict)
    _keys: dict[str, UserRecord] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> dict[str, UserRecord]:
        """The records by case-mapped user (an unreadable file keeps the previous ones)."""
        if self._stamp is None:
            self._stamp = FileStamp(self.path, self.check_interval)
        stamp = self._stamp.stamp()
        if self._loaded and stamp == self._seen:
            return self.records
        with self._lock:
            if stamp is None:
                self.records, self.format = {}, "tampu"
            else:
                try:
                    self.format, self.records = read_users_file(self.path)
                except (OSError, UnicodeDecodeError, UsersFileError) as exc:
                    log.error("%s; keeping the users read before", exc)
            self._keys = {lookup_key(u, self.separators, self.drop): r
                          for u, r in self.records.items()}
            self._seen, self._loaded = stamp, True
        return self.records

    def get(self, user: str) -> UserRecord | None:
        """The user named exactly (case-mapped), as AUTH logins are looked up."""
        return self.load().get(normalize_user(user))

    def owner_of(self, user: str) -> UserRecord | None:
        """The user an address's user part belongs to (suffix, drop characters removed)."""
        self.load()
        return self._keys.get(lookup_key(user, self.separators, self.drop))

    def refresh(self) -> None:
        if self._stamp is not None:
            self._stamp.refresh()


class UsersFileError(ValueError):
    """A users file that cannot be read; the message names the file and the line."""


def read_users_file(path: Path) -> tuple[Format, dict[str, UserRecord]]:
    """Parse a users file in either format. Raises UsersFileError, OSError."""
    text = path.read_text(encoding="utf-8")
    first = next((ln.strip() for ln in text.splitlines()
                  if ln.strip() and not ln.lstrip().startswith("#")), "")
    if first.startswith("users"):
        from tampu.chasquid import ChasquidError, TextFormatError, parse_users

        try:
            entries = parse_users(text)
        except (ChasquidError, TextFormatError) as exc:
            raise UsersFileError(f"{path}: {exc}") from None
        return "chasquid", {normalize_user(u): UserRecord(normalize_user(u), e.to_tampu_hash(),
                                                          e.receive_only)
                            for u, e in entries.items()}
    records: dict[str, UserRecord] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        user, encoded = user.strip(), encoded.strip()
        if not sep or not user or not (encoded.startswith(("$scrypt$", "$chasquid-"))
                                         or encoded == RECEIVE_ONLY):
            raise UsersFileError(f"{path}: line {lineno}: expected user:$scrypt$..., "
                                 "as `tampu user add` writes")
        key = normalize_user(user)
        records[key] = UserRecord(key, encoded, encoded == RECEIVE_ONLY)
    return "tampu", records


def write_users_file(path: Path, records: dict[str, UserRecord], fmt: Format) -> None:
    """Write ``records`` atomically, keeping the file's mode and owner if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "chasquid":  # chasquid can still read it
        from tampu.chasquid import UserEntry, format_users, from_tampu_hash

        body = format_users({r.user: UserEntry.new_denied() if r.receive_only
                             else from_tampu_hash(r.secret) or UserEntry.new_denied()
                             for r in records.values()})
    else:
        body = TAMPU_HEADER + "".join(
            f"{u}:{RECEIVE_ONLY if r.receive_only else r.secret}\n"
            for u, r in sorted(records.items()))
    write_durably(path, [body.encode("utf-8")], mode=0o600, keep_attributes=True)


class UserSource(Protocol):
    """Another place users live (Dovecot): answers for the domains it serves, else None."""

    def authenticate(self, login: str, password: str) -> Awaitable[bool | None]: ...

    def exists(self, address: str) -> Awaitable[bool | None]: ...


AuthOutcome = tuple[bool, str, str]
"""(success, canonical user@domain, reason)."""


class UserDirectory:
    """All users of all local domains."""

    def __init__(self, domains: Domains, separators: str = "+", drop: str = ".",
                 check_interval: float = 0.0) -> None:
        self.domains = domains
        self.separators = separators
        self.drop = drop
        self.check_interval = check_interval
        self._files: dict[str, UsersFile] = {}
        self.sources: list[UserSource] = []

    def add_source(self, source: UserSource) -> None:
        self.sources.append(source)

    def file(self, domain: str) -> UsersFile:
        """The users file of ``domain`` (any spelling). Raises AddressError."""
        canonical = normalize_domain(domain)
        found = self._files.get(canonical)
        if found is None:
            found = self._files[canonical] = UsersFile(
                self.domains.folder(canonical) / "users", self.check_interval,
                self.separators, self.drop)
        return found

    def has_file(self, domain: str) -> bool:
        try:
            return self.file(domain).path.exists()
        except AddressError:
            return False

    def owner(self, address: str) -> UserRecord | None:
        """The user of a local ``address`` (suffix and drop characters ignored), if any."""
        user, _, domain = address.rpartition("@")
        if not user or not self.domains.is_local(domain):
            return None
        return self.file(domain).owner_of(user)

    async def exists(self, address: str) -> bool:
        """Whether ``address`` belongs to a local user (files first, then other sources)."""
        if self.owner(address) is not None:
            return True
        for source in self.sources:
            if await source.exists(address):
                return True
        return False

    def check_password(self, login: str, password: str) -> AuthOutcome | None:
        """Check credentials against the users files (blocking: scrypt). None: no file
        knows the domain, let other sources answer."""
        user, at, domain = login.rpartition("@")
        if not at or not user or not domain or not self.domains.is_local(domain):
            return None
        canonical = f"{normalize_user(user)}@{normalize_domain(domain)}"
        users = self.file(domain)
        if not users.path.exists() and self.sources:
            return None
        record = users.get(user)
        if record is None:
            burn_time(password)
            return False, canonical, "unknown user"
        if record.receive_only:
            burn_time(password)
            return False, canonical, "receive-only user"
        if record.verify(password):
            return True, canonical, ""
        return False, canonical, "wrong password"

    def problems(self) -> list[str]:
        """Every users file that cannot be read, with file and line (``tampu check``)."""
        out = []
        for domain in sorted(self.domains.all()):
            path = self.domains.folder(domain) / "users"
            if path.exists():
                try:
                    read_users_file(path)
                except (OSError, UnicodeDecodeError, UsersFileError) as exc:
                    out.append(str(exc))
        return out

