"""The per-domain security level store (chasquid's domaininfo), shared through the server stash.

One small JSON file per domain in ``<data_dir>/domaininfo/<domain>.json``::

    {"domain": "example.com", "incoming": "plain", "outgoing": "tls_verified"}

Each file is replaced atomically (write to a temporary file, fsync, rename, fsync the folder)
under an exclusive ``flock`` on ``.lock``, so reception workers and the delivery process can
share the folder. Removing a domain's file makes tampu forget it (the manual override for a
domain that really lowered its security).

Other plugins reach the store through the server's stash::

    from tampu.plugins.domaininfo.store import DOMAININFO_STORE, SecLevel
    store = context.stash.get(DOMAININFO_STORE, None)   # None: domaininfo is not enabled
    ok = await asyncio.to_thread(store.check_outgoing, "example.com", SecLevel.TLS_VERIFIED)

The store's methods do file I/O: call them in a thread (``asyncio.to_thread``) or from a
``@blocking`` hook, never directly on the event loop; ``cached_level`` is the exception (a stat
at most every ``check_interval`` seconds) for a fast path on the loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from tampu import StashKey
from tampu.addresses import AddressError, normalize_domain
from tampu.files import FileStamp, Stamp, fsync_dir, write_durably

log = logging.getLogger("tampu.plugins.domaininfo")

Direction = Literal["incoming", "outgoing"]


class SecLevel(IntEnum):
    """Security levels, lowest first (chasquid's, minus its unused TLS_CLIENT)."""

    PLAIN = 0
    """No TLS."""
    TLS_UNVERIFIED = 1
    """TLS, but the certificate did not verify (or, incoming, any TLS: client certificates
    are not verified)."""
    TLS_VERIFIED = 2
    """TLS with a certificate that verified for the name we connected to (outgoing only)."""

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> SecLevel:
        try:
            return cls[label.upper()]
        except KeyError:
            return cls.PLAIN


class DomainInfoStore:
    """Remembers, per domain, the highest security level seen in each direction."""

    def __init__(self, directory: Path, *, incoming: bool = True, outgoing: bool = True,
                 check_interval: float = 0.0) -> None:
        self.directory = directory
        self.incoming_enabled = incoming
        self.outgoing_enabled = outgoing
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[FileStamp, Stamp | None, dict[str, str]]] = {}

    # ------------------------------------------------------------------ reading

    def path(self, domain: str) -> Path | None:
        """The file of ``domain``, or None for a name that cannot be a domain."""
        try:
            name = normalize_domain(domain)
        except AddressError:
            return None
        if not name or name.startswith((".", "[")):
            return None
        return self.directory / (quote(name, safe="@-_.") + ".json")

    def _read(self, path: Path) -> dict[str, str]:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("domaininfo: unreadable %s (%s); treating it as empty", path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, str)}

    def level(self, domain: str, direction: Direction) -> SecLevel:
        """The recorded level (PLAIN when nothing is recorded)."""
        path = self.path(domain)
        if path is None:
            return SecLevel.PLAIN
        return SecLevel.from_label(self._read(path).get(direction, "plain"))

    def domains(self) -> list[str]:
        """Every domain with a record, as recorded."""
        out = []
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else ():
            name = self._read(path).get("domain")
            if name:
                out.append(name)
        return out

    def incoming(self, domain: str) -> SecLevel:
        return self.level(domain, "incoming")

    def outgoing(self, domain: str) -> SecLevel:
        return self.level(domain, "outgoing")

    def cached_level(self, domain: str, direction: Direction) -> SecLevel:
        """The recorded level from memory, re-read when the file changed (it is stat'ed at most
        every ``check_interval`` seconds). Cheap enough for the event loop: a check whose level
        equals this one needs no thread and no lock."""
        path = self.path(domain)
        if path is None:
            return SecLevel.PLAIN
        entry = self._cache.get(path)
        watch = entry[0] if entry is not None else FileStamp(path, self.check_interval)
        stamp = watch.stamp()
        if entry is None or entry[1] != stamp:
            entry = (watch, stamp, self._read(path) if stamp is not None else {})
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[path] = entry
        return SecLevel.from_label(entry[2].get(direction, "plain"))

    # ------------------------------------------------------------------ checking

    def check_incoming(self, domain: str, level: SecLevel) -> bool:
        """Mail from ``domain`` arrived at ``level``: False if that is a downgrade."""
        if not self.incoming_enabled:
            return True
        return self._check(domain, "incoming", level)

    def check_outgoing(self, domain: str, level: SecLevel) -> bool:
        """A connection for ``domain`` reached ``level``: False if that is a downgrade."""
        if not self.outgoing_enabled:
            return True
        return self._check(domain, "outgoing", level)

    def _check(self, domain: str, direction: Direction, level: SecLevel) -> bool:
        """Compare with the record; raise the record when ``level`` is higher."""
        path = self.path(domain)
        if path is None:
            return True
        with self._locked():
            data = self._read(path)
            known = SecLevel.from_label(data.get(direction, "plain"))
            if level < known:
                log.warning("domaininfo: %s security level downgrade for %s: %s < recorded %s",
                            direction, domain, level.label, known.label)
                return False
            if level > known:
                data["domain"] = domain.lower().rstrip(".")
                data[direction] = level.label
                self._write(path, data)
                self._cache.pop(path, None)  # effective at once for the next session
                log.info("domaininfo: %s level of %s raised to %s", direction, domain,
                         level.label)
        return True

    def forget(self, domain: str) -> bool:
        """Remove what is known of ``domain``. True if there was a record."""
        path = self.path(domain)
        if path is None:
            return False
        with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            fsync_dir(self.directory)
        return True

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads (a lock) and other processes (flock on ``.lock``)."""
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _write(self, path: Path, data: dict[str, str]) -> None:
        write_durably(path, [json.dumps(data, sort_keys=True).encode() + b"\n"])


DOMAININFO_STORE: StashKey[DomainInfoStore] = StashKey()
"""Key of the running store in ``ServerContext.stash`` (absent when domaininfo is disabled)."""
