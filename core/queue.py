"""The on-disk queue: durable items, one file per message plus a small state file.

Layout of ``<data_dir>/queue/``:

* ``<id>.item`` — one line of JSON (the envelope and recipients as enqueued, and ``size``, the
  length of the message), ``\\n``, then the message bytes. Written once: to ``.tmp-<id>``,
  fsync, rename, fsync of the directory. Only then does the client get ``250``.
* ``<id>.state`` — JSON with per-recipient results (and the item's ``extra``), replaced
  atomically (same dance) after each delivery attempt, so a restart never redoes a finished
  recipient.
* ``.tmp-*`` — half-written files from a crash before rename: removed at start (those older
  than this process: reception workers may be writing newer ones).
* ``corrupt/`` — items that cannot be read are moved here with a log line.
* ``retry/`` — requests from ``tampu queue retry`` (one empty file per ID, or ``all``), served by
  the running server on SIGUSR1 and cleared at start.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tampu.errors import QueueError, QueueFull
from tampu.files import TMP_PREFIX, write_durably
from tampu.item import QueueItem, Recipient

if TYPE_CHECKING:
    from tampu.caller import Hooks
    from tampu.envelope import Envelope

log = logging.getLogger("tampu.queue")

ITEM_SUFFIX = ".item"
STATE_SUFFIX = ".state"
RETRY_DIR = "retry"
CORRUPT_DIR = "corrupt"
_ID_RE = re.compile(r"^[a-z0-9]{1,64}$")
_PROCESS_START = time.time()
"""Before any reception worker forks: older ``.tmp-*`` files are leftovers of a crash."""


def valid_id(item_id: str) -> bool:
    """A queue ID as tampu makes them (so it is safe as a file name)."""
    return bool(_ID_RE.match(item_id))


def format_age(seconds: float) -> str:
    """An item's age for people: ``42s``, ``17m``, ``3.5h``."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class _QueueIds:
    """Queue IDs: time (ms), a per-process random prefix and a counter; no syscall per ID."""

    def __init__(self) -> None:
        self.pid = -1
        self.prefix = b""
        self.counter = itertools.count()

    def next(self) -> str:
        if self.pid != os.getpid():  # first use, or a forked reception worker
            self.pid = os.getpid()
            self.prefix = secrets.token_bytes(3)
            self.counter = itertools.count(secrets.randbelow(1 << 16))
        raw = (int(time.time() * 1000).to_bytes(6, "big") + self.prefix
               + (next(self.counter) & 0xFFFF).to_bytes(2, "big"))
        return base64.b32encode(raw).decode().lower().rstrip("=")


_ids = _QueueIds()


def new_queue_id() -> str:
    """Sortable by time (ms), 18 characters of lower-case base32."""
    return _ids.next()


class Queue:
    """The queue directory: write, read, update and remove items. Safe across processes."""

    def __init__(self, directory: Path, hooks: Hooks, max_items: int, fsync: bool = True) -> None:
        self.dir = directory
        self.hooks = hooks
        self.max_items = max_items
        self.fsync = fsync
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / CORRUPT_DIR).mkdir(exist_ok=True)
        self._estimate = 0
        self._counted_at = -1.0
        self.listeners: list[Callable[[QueueItem], None]] = []
        """Called with each new item once it is durable (the delivery runner subscribes)."""

    new_id = staticmethod(new_queue_id)

    def item_path(self, item_id: str) -> Path:
        return self.dir / f"{item_id}{ITEM_SUFFIX}"

    def count(self) -> int:
        """Items in the queue directory (all processes), read from disk."""
        n = 0
        with os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.endswith(ITEM_SUFFIX) and not entry.name.startswith("."):
                    n += 1
        return n

    def _is_full(self) -> bool:
        """Cheap check: a directory scan at most every 0.5 s, or when the estimate is close."""
        now = time.monotonic()
        if now - self._counted_at > 0.5 or self._estimate >= self.max_items * 0.8:
            self._estimate = self.count()
            self._counted_at = now
        return self._estimate >= self.max_items

    def full(self) -> bool:
        """True when the queue holds ``max_items`` items: new mail gets ``452 4.3.1``."""
        return self._is_full()

    def ids(self) -> list[str]:
        return sorted(
            p.name[: -len(ITEM_SUFFIX)] for p in self.dir.iterdir()
            if p.name.endswith(ITEM_SUFFIX) and not p.name.startswith(".")
        )

    # ------------------------------------------------------------------ operator requests

    def request_retry(self, ids: list[str]) -> None:
        """Leave retry requests for the running server (``tampu queue retry``)."""
        rdir = self.dir / RETRY_DIR
        rdir.mkdir(exist_ok=True)
        for item_id in ids or ["all"]:
            if item_id != "all" and not valid_id(item_id):
                raise QueueError(f"not a queue ID: {item_id!r}")
            (rdir / item_id).touch()

    def take_retry_requests(self) -> list[str]:
        """The pending retry requests (IDs or ``all``), removed as they are taken."""
        rdir = self.dir / RETRY_DIR
        try:
            entries = list(rdir.iterdir())
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            entry.unlink(missing_ok=True)
            if entry.name == "all" or valid_id(entry.name):
                names.append(entry.name)
        return sorted(names)

    # ------------------------------------------------------------------ writing

    async def submit(
        self,
        *,
        mail_from: str,
        recipients: list[str],
        data: bytes,
        envelope: Envelope | None = None,
        item_id: str | None = None,
        auth_user: str | None = None,
        origin: str = "smtp",
        peer: str = "",
        helo: str = "",
        extra: dict[str, Any] | None = None,
        check_full: bool = True,
    ) -> QueueItem:
        """Expand the recipients, write the item durably, tell the listeners. Returns it.

        Raises QueueFull when ``max_items`` is reached (not for DSNs: ``check_full=False``).
        """
        if check_full and self._is_full():
            raise QueueFull(f"queue holds {self.max_items} items")
        item = QueueItem(
            id=item_id or self.new_id(), mail_from=mail_from, recipients=[],
            auth_user=auth_user, origin=origin, peer=peer, helo=helo,
            smtputf8=bool(envelope.smtputf8) if envelope else False, extra=dict(extra or {}),
        )
        seen: set[str] = set()
        for rcpt in recipients:
            expanded = await self.hooks.queue_expand_recipient(envelope, item, rcpt)
            finals = expanded if expanded is not None else [Recipient(rcpt, rcpt)]
            for final in finals:
                key = final.address.lower() + json.dumps(final.route, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    item.recipients.append(final)
        if not item.recipients:
            log.info("qid=%s has no recipients after expansion; dropped", item.id)
        added = await self.hooks.queue_add_headers(item, data)
        if added:
            data = b"".join(f"{n}: {v}\r\n".encode("utf-8", "surrogateescape")
                            for n, v in added) + data
        await self.write(item, data)
        self._estimate += 1
        item._data = data  # the delivery runner's first round needs no re-read
        await self.hooks.queue_enqueued(item)
        for listener in self.listeners:
            listener(item)
        return item

    async def write(self, item: QueueItem, data: bytes) -> None:
        fields = {**item.header_json(), "size": len(data)}
        header = json.dumps(fields, separators=(",", ":")).encode()
        await asyncio.to_thread(write_durably, self.item_path(item.id),
                                [header, b"\n", data], self.fsync)

    async def save_state(self, item: QueueItem) -> None:
        """Write the item's delivery results durably (nothing if an operator deleted it)."""
        if not self.item_path(item.id).exists():
            return
        state = {**item.state_json(), "extra": item.extra}
        body = json.dumps(state, separators=(",", ":")).encode()
        await asyncio.to_thread(write_durably, self.dir / f"{item.id}{STATE_SUFFIX}",
                                [body], self.fsync)

    async def remove(self, item: QueueItem) -> None:
        await asyncio.to_thread(self._remove_files, item.id)
        self._estimate = max(0, self._estimate - 1)

    def _remove_files(self, item_id: str) -> None:
        # No directory fsync: an item that reappears after a crash is delivered again
        # (twice is allowed, zero times is not).
        for suffix in (STATE_SUFFIX, ITEM_SUFFIX):
            try:
                os.unlink(self.dir / f"{item_id}{suffix}")
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ reading

    def read_message(self, item_id: str) -> bytes:
        with open(self.item_path(item_id), "rb") as fh:
            fh.readline()
            return fh.read()

    def load(self, item_id: str) -> QueueItem:
        """Read one item and its state. Raises QueueError for a missing or corrupt item."""
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
        if isinstance(size, int) and total != len(header) + size:
            raise QueueError(f"corrupt queue item {item_id}: message is {total - len(header)} "
                             f"bytes, expected {size}")
        state_path = self.dir / f"{item_id}{STATE_SUFFIX}"
        try:
            state = json.loads(state_path.read_bytes())
            item.apply_state(state)
            item.extra.update(state.get("extra") or {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("qid=%s: unreadable state file (%s); resuming from enqueue state",
                        item_id, exc)
        return item

    def recover(self) -> list[QueueItem]:
        """At start: clean half-written files, move corrupt items aside, load the rest."""
        items = []
        for entry in list(self.dir.iterdir()):
            if entry.name.startswith(TMP_PREFIX):
                try:
                    if entry.stat().st_mtime >= _PROCESS_START:
                        continue  # being written right now by a reception worker
                except FileNotFoundError:
                    continue
                log.warning("removing half-written queue file %s", entry.name)
                entry.unlink(missing_ok=True)
        self.take_retry_requests()  # every item is tried at start anyway
        for item_id in self.ids():
            try:
                items.append(self.load(item_id))
            except QueueError as exc:
                self.quarantine(item_id, str(exc))
        for entry in self.dir.iterdir():
            if entry.name.endswith(STATE_SUFFIX) and not self.item_path(
                    entry.name[: -len(STATE_SUFFIX)]).exists():
                entry.unlink(missing_ok=True)
        items.sort(key=lambda i: i.created)
        return items

    def quarantine(self, item_id: str, reason: str) -> None:
        """Move an unreadable item (and its state) to ``corrupt/`` for an operator to look at."""
        log.error("qid=%s: %s; moved to %s", item_id, reason, self.dir / CORRUPT_DIR)
        for suffix in (ITEM_SUFFIX, STATE_SUFFIX):
            src = self.dir / f"{item_id}{suffix}"
            if src.exists():
                os.replace(src, self.dir / CORRUPT_DIR / src.name)
