"""The filesystem queue store (the embedded default): one file per message, one per state.

Layout of ``<data_dir>/queue/``:

* ``<id>.item`` — one line of JSON (the envelope and recipients as enqueued, and ``size``, the
  length of the message), ``\\n``, then the message bytes. Written once: to ``.tmp-<id>``,
  fsync, rename, fsync of the directory. Only then does the client get ``250``.
* ``<id>.state`` — JSON with per-recipient results, hold flag and the item's ``extra``,
  replaced atomically (same dance) after each delivery attempt.
* ``.tmp-*`` — half-written files: a write that fails (disk full) removes its own at once;
  those a crash left before rename are removed at start (those older than this process:
  reception workers may be writing newer ones).

Reception's writes (``put``) run in the event loop's default thread pool; the delivery side's
(states, reads, removals, loads, recovery) in a small pool of their own (:data:`QUEUE_THREADS`),
so that a busy delivery loop never makes a client's ``DATA`` wait for a thread.
* ``corrupt/`` — items that cannot be read are moved here with a log line.
* ``requests/`` — operator requests (``<action>.<id>`` or ``<action>.all``, empty files) from
  ``tampu queue``, served by the running server on SIGUSR1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tampu.errors import QueueError
from tampu.files import TMP_PREFIX, write_durably
from tampu.item import QueueItem
from tampu.store import new_queue_id, valid_id

log = logging.getLogger("tampu.queue")

ITEM_SUFFIX = ".item"
STATE_SUFFIX = ".state"
REQUESTS_DIR = "requests"
CORRUPT_DIR = "corrupt"
ACTIONS = ("retry", "delete", "hold", "release")
_PROCESS_START = time.time()
"""Before any reception worker forks: older ``.tmp-*`` files are leftovers of a crash."""
QUEUE_THREADS = 8
"""Threads of the delivery side's queue I/O (one pool per process, made at first use)."""
_T = TypeVar("_T")
_pool: tuple[int, ThreadPoolExecutor] | None = None


async def _in_queue_thread(func: Callable[..., _T], *args: object) -> _T:
    """Run ``func(*args)`` in the queue I/O pool (re-made in a forked process)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(QUEUE_THREADS, thread_name_prefix="tampu-queue"))
    return await asyncio.get_running_loop().run_in_executor(_pool[1], func, *args)


class FilesystemStore:
    """The queue directory. Safe across the processes of one server (reception workers)."""

    def __init__(self, directory: Path, max_items: int, fsync: bool = True) -> None:
        self.dir = directory
        self.max_items = max_items
        self.fsync = fsync
        self._ready = False
        self._estimate = 0
        self._counted_at = -1.0

    new_id = staticmethod(new_queue_id)

    def prepare(self) -> None:
        """Make the queue directories (at start and before the first write)."""
        if not self._ready:
            (self.dir / CORRUPT_DIR).mkdir(parents=True, exist_ok=True)
            self._ready = True

    def item_path(self, item_id: str) -> Path:
        return self.dir / f"{item_id}{ITEM_SUFFIX}"

    def state_path(self, item_id: str) -> Path:
        return self.dir / f"{item_id}{STATE_SUFFIX}"

    def count(self) -> int:
        """Items in the queue directory (all processes), read from disk."""
        try:
            with os.scandir(self.dir) as it:
                return sum(1 for e in it if e.name.endswith(ITEM_SUFFIX) and e.name[0] != ".")
        except FileNotFoundError:
            return 0

    def full(self) -> bool:
        """A directory scan at most every 0.5 s, or when the estimate is close to the cap."""
        now = time.monotonic()
        if now - self._counted_at > 0.5 or self._estimate >= self.max_items * 0.8:
            self._estimate = self.count()
            self._counted_at = now
        return self._estimate >= self.max_items

    def ids_now(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(ITEM_SUFFIX)] for n in names
                      if n.endswith(ITEM_SUFFIX) and not n.startswith("."))

    async def ids(self) -> list[str]:
        return self.ids_now()

    async def exists(self, item_id: str) -> bool:
        return valid_id(item_id) and self.item_path(item_id).exists()

    # ------------------------------------------------------------------ writing

    async def put(self, item: QueueItem, message: bytes) -> None:
        self.prepare()
        item.size = len(message)
        header = json.dumps({**item.header_json(), "size": len(message)},
                            separators=(",", ":")).encode()
        await asyncio.to_thread(write_durably, self.item_path(item.id),
                                [header, b"\n", message], self.fsync)
        self._estimate += 1

    async def save_state(self, item: QueueItem) -> None:
        if not self.item_path(item.id).exists():
            return  # deleted by an operator
        body = json.dumps(item.state_json(), separators=(",", ":")).encode()
        await _in_queue_thread(write_durably, self.state_path(item.id), [body], self.fsync)

    async def remove(self, item: QueueItem) -> None:
        await _in_queue_thread(self.remove_now, item.id)
        self._estimate = max(0, self._estimate - 1)

    def remove_now(self, item_id: str) -> bool:
        """Remove an item's files (no directory fsync: an item that reappears after a crash
        is delivered again). True if the item was there."""
        found = False
        for path in (self.state_path(item_id), self.item_path(item_id)):
            try:
                os.unlink(path)
                found = True
            except FileNotFoundError:
                pass
        return found

    # ------------------------------------------------------------------ reading

    async def read_message(self, item_id: str) -> bytes:
        return await _in_queue_thread(self.read_message_now, item_id)

    def read_message_now(self, item_id: str) -> bytes:
        try:
            with open(self.item_path(item_id), "rb") as fh:
                fh.readline()
                return fh.read()
        except FileNotFoundError:
            raise QueueError(f"no queue item {item_id}") from None

    async def load(self, item_id: str) -> QueueItem:
        return await _in_queue_thread(self.load_now, item_id)

    def load_now(self, item_id: str) -> QueueItem:
        if not valid_id(item_id):
            raise QueueError(f"not a queue ID: {item_id!r}")
        path = self.item_path(item_id)
        try:
            with open(path, "rb") as fh:
                header = fh.readline()
                total = os.fstat(fh.fileno()).st_size
            fields = json.loads(header)
            item = QueueItem.from_json(fields)
        except FileNotFoundError:
            raise QueueError(f"no queue item {item_id}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QueueError(f"corrupt queue item {item_id}: {exc}") from exc
        if not header.endswith(b"\n") or item.id != item_id:
            raise QueueError(f"corrupt queue item {item_id}: truncated header")
        size = fields.get("size")
        if isinstance(size, int):
            item.size = size
            if total != len(header) + size:
                raise QueueError(f"corrupt queue item {item_id}: message is "
                                 f"{total - len(header)} bytes, expected {size}")
        try:
            item.apply_state(json.loads(self.state_path(item_id).read_bytes()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("qid=%s: unreadable state file (%s); resuming from enqueue state",
                        item_id, exc)
        return item

    async def recover(self) -> list[str]:
        return await _in_queue_thread(self._recover)

    def _recover(self) -> list[str]:
        """Remove old ``.tmp-*`` files and orphan states; the IDs, oldest first. Items are
        not read here: the delivery loop loads them as it gets to them."""
        self.prepare()
        for entry in list(self.dir.iterdir()):
            if entry.name.startswith(TMP_PREFIX):
                try:
                    if entry.stat().st_mtime >= _PROCESS_START:
                        continue  # being written right now by a reception worker
                except FileNotFoundError:
                    continue
                log.warning("removing half-written queue file %s", entry.name)
                entry.unlink(missing_ok=True)
            elif entry.name.endswith(STATE_SUFFIX) and not self.item_path(
                    entry.name[: -len(STATE_SUFFIX)]).exists():
                entry.unlink(missing_ok=True)  # its item is gone (a state is written after)
        ids = self.ids_now()  # queue IDs sort by time: oldest first
        self._estimate = len(ids)
        return ids

    async def quarantine(self, item_id: str, reason: str) -> None:
        await _in_queue_thread(self.quarantine_now, item_id, reason)

    def quarantine_now(self, item_id: str, reason: str) -> None:
        moved = False
        for path in (self.item_path(item_id), self.state_path(item_id)):
            try:
                os.replace(path, self.dir / CORRUPT_DIR / path.name)
                moved = True
            except FileNotFoundError:
                pass
        if moved:
            log.error("qid=%s: %s; moved to %s", item_id, reason, self.dir / CORRUPT_DIR)

    def corrupt_count(self) -> int:
        corrupt = self.dir / CORRUPT_DIR
        return sum(1 for p in corrupt.iterdir() if p.name.endswith(ITEM_SUFFIX)) \
            if corrupt.is_dir() else 0

    # ------------------------------------------------------------------ operator requests

    async def request(self, action: str, ids: list[str]) -> None:
        if action not in ACTIONS:
            raise QueueError(f"unknown queue action {action!r}")
        rdir = self.dir / REQUESTS_DIR
        rdir.mkdir(parents=True, exist_ok=True)
        for item_id in ids or ["all"]:
            if item_id != "all" and not valid_id(item_id):
                raise QueueError(f"not a queue ID: {item_id!r}")
            (rdir / f"{action}.{item_id}").touch()

    async def take_requests(self) -> list[tuple[str, str]]:
        rdir = self.dir / REQUESTS_DIR
        try:
            entries = sorted(rdir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            entry.unlink(missing_ok=True)
            action, _, item_id = entry.name.partition(".")
            if action in ACTIONS and (item_id == "all" or valid_id(item_id)):
                out.append((action, item_id))
        return out
