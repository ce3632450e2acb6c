"""The state store: small keyed values that policies remember between connections.

Security levels learned per domain (domaininfo), rate-limit and AUTH-failure counters,
greylisting triplets: values by ``(namespace, key)``, JSON-serialisable, each with an optional
expiry. Plugins reach the running store as ``context.state`` (a :class:`ServerContext` field).

Two implementations:

* :class:`LocalStateStore`, the embedded default (``[server] state_store = "files"``): a value
  with an expiry (counters, locks, triplets) lives in this process's memory; a value without
  one is a small JSON file, ``<data_dir>/<namespace>/<key>.json``, replaced atomically and
  compared-and-set under an ``flock`` so that the processes of one server share it;
* the PostgreSQL store of the ``queue_postgres`` plugin (``state_store = "postgres"``): one
  table that every node shares, so that a policy holds whichever node a client reaches.

Every method is a coroutine and may raise :class:`tampu.errors.StateError` when the store is
unreachable; a policy then decides whether to fail open or closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

from tampu.errors import StateError
from tampu.files import fsync_dir, write_durably

MAX_MEMORY_KEYS = 200_000
"""Values with an expiry kept in memory by a local store; the least recently written go first."""


class StateStore(Protocol):
    """What policies need of a state store."""

    shared: bool
    """True when other nodes see the same values (PostgreSQL); False for this node only."""

    async def get(self, ns: str, key: str) -> Any | None:
        """The value, or None when absent or expired."""
        ...

    async def put(self, ns: str, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Set the value; ``ttl``: seconds until it expires (None: never)."""
        ...

    async def delete(self, ns: str, key: str) -> bool:
        """Remove the value; True if there was one."""
        ...

    async def incr(self, ns: str, key: str, by: int = 1, *, ttl: float) -> int:
        """Add ``by`` to a counter and return the new count. A counter that is absent or has
        expired starts at ``by`` and expires ``ttl`` seconds later: the window starts at the
        first increment and later ones do not extend it."""
        ...

    async def compare_and_set(self, ns: str, key: str, expected: Any | None, new: Any | None,
                              *, ttl: float | None = None) -> bool:
        """Set the value to ``new`` (None: remove it) only if it is ``expected`` now (None:
        absent). True if it was set. The building block of every read-modify-write."""
        ...

    async def items(self, ns: str) -> list[tuple[str, Any]]:
        """Every live (key, value) of a namespace, by key (for operators' commands)."""
        ...


async def update(store: StateStore, ns: str, key: str, change: Callable[[Any | None], Any],
                 *, ttl: float | None = None, attempts: int = 20) -> tuple[Any | None, Any]:
    """Read-modify-write with compare-and-set: ``change(old)`` gives the new value (returning
    ``old`` unchanged writes nothing). Returns (old, new). Raises StateError after
    ``attempts`` lost races."""
    for _ in range(attempts):
        old = await store.get(ns, key)
        new = change(old)
        if new == old or await store.compare_and_set(ns, key, old, new, ttl=ttl):
            return old, new
    raise StateError(f"state {ns}/{key}: too many concurrent updates")


def _file_name(key: str) -> str:
    name = quote(key, safe="@-_.")
    return ("%2E" + name[1:] if name.startswith(".") else name) + ".json"


class LocalStateStore:
    """Files (values without expiry) and memory (values with one) of this node."""

    shared = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.directories: dict[str, Path] = {}
        self._memory: collections.OrderedDict[tuple[str, str], tuple[Any, float]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def directory(self, ns: str) -> Path:
        """Where the durable values of ``ns`` are: ``<root>/<ns>``, unless a plugin set it
        (:meth:`set_directory`)."""
        return self.directories.get(ns) or self.root / ns

    def set_directory(self, ns: str, path: Path) -> None:
        """Keep the durable values of ``ns`` in ``path`` (a plugin's ``directory`` setting)."""
        self.directories[ns] = path

    def path(self, ns: str, key: str) -> Path:
        return self.directory(ns) / _file_name(key)

    # ------------------------------------------------------------------ memory

    def _live(self, ns: str, key: str, now: float) -> tuple[Any, float] | None:
        entry = self._memory.get((ns, key))
        if entry is not None and entry[1] <= now:
            del self._memory[(ns, key)]
            return None
        return entry

    def _remember(self, ns: str, key: str, value: Any, expires: float) -> None:
        self._memory[(ns, key)] = (value, expires)
        self._memory.move_to_end((ns, key))
        while len(self._memory) > MAX_MEMORY_KEYS:
            self._memory.popitem(last=False)

    # ------------------------------------------------------------------ files

    def _read(self, path: Path) -> Any | None:
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"unreadable state file {path}: {exc}") from exc

    @contextlib.contextmanager
    def _locked(self, ns: str) -> Iterator[Path]:
        """This process's threads (a lock) and the server's other processes (flock)."""
        directory = self.directory(ns)
        with self._lock:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield directory
            finally:
                os.close(fd)

    def _write(self, path: Path, value: Any | None) -> bool:
        if value is None:
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            fsync_dir(path.parent)
            return True
        write_durably(path, [json.dumps(value, sort_keys=True).encode() + b"\n"])
        return True

    def _cas_file(self, ns: str, key: str, expected: Any | None, new: Any | None) -> bool:
        path = self.path(ns, key)
        with self._locked(ns):
            if self._read(path) != expected:
                return False
            self._write(path, new)
            return True

    def _items_files(self, ns: str) -> list[tuple[str, Any]]:
        directory = self.directory(ns)
        out = []
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
            try:
                value = self._read(path)
            except StateError:
                continue
            if value is not None:
                out.append((unquote(path.name[: -len(".json")]), value))
        return out

    # ------------------------------------------------------------------ the interface

    async def get(self, ns: str, key: str) -> Any | None:
        entry = self._live(ns, key, time.time())
        if entry is not None:
            return entry[0]
        return await asyncio.to_thread(self._read, self.path(ns, key))

    async def put(self, ns: str, key: str, value: Any, *, ttl: float | None = None) -> None:
        if ttl is not None:
            self._remember(ns, key, value, time.time() + ttl)
            return

        def write() -> None:
            with self._locked(ns):
                self._write(self.path(ns, key), value)

        await asyncio.to_thread(write)

    async def delete(self, ns: str, key: str) -> bool:
        found = self._memory.pop((ns, key), None) is not None

        def remove() -> bool:
            with self._locked(ns):
                return self._write(self.path(ns, key), None)

        if not self.path(ns, key).exists():
            return found
        return await asyncio.to_thread(remove) or found

    async def incr(self, ns: str, key: str, by: int = 1, *, ttl: float) -> int:
        now = time.time()
        entry = self._live(ns, key, now)
        if entry is None:
            self._remember(ns, key, by, now + ttl)
            return by
        count = int(entry[0]) + by
        self._remember(ns, key, count, entry[1])
        return count

    async def compare_and_set(self, ns: str, key: str, expected: Any | None, new: Any | None,
                              *, ttl: float | None = None) -> bool:
        if ttl is not None or self._live(ns, key, time.time()) is not None:
            entry = self._live(ns, key, time.time())
            if (entry[0] if entry is not None else None) != expected:
                return False
            if new is None:
                self._memory.pop((ns, key), None)
            else:
                self._remember(ns, key, new, time.time() + ttl if ttl is not None
                               else float("inf"))
            return True
        return await asyncio.to_thread(self._cas_file, ns, key, expected, new)

    async def items(self, ns: str) -> list[tuple[str, Any]]:
        now = time.time()
        found = dict(await asyncio.to_thread(self._items_files, ns))
        for (space, key), (value, expires) in list(self._memory.items()):
            if space == ns and expires > now:
                found[key] = value
        return sorted(found.items())
