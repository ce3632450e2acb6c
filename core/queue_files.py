"""The files of the filesystem queue: their names in ``<data_dir>/queue/``, the item file
format, and reading, writing, removing and quarantining them one at a time.

Layout of ``<data_dir>/queue/``:

* ``<id>.item`` — one line of JSON (the envelope and recipients as enqueued, and ``size``, the
  length of the message), ``\\n``, then the message bytes. A new item's bytes go to the queue
  log (:mod:`tampu.queue_log`) and stay in memory: one ``fdatasync`` of the log makes every
  item of a batch durable — only then do their clients get ``250``. Its file is written
  (to ``.tmp-<id>.item``, then renamed, without fsync of its own) only when the item
  outlives its log record: before a state is written for it, or when a checkpoint (one
  ``syncfs``, every few seconds) retires the log segment while the item is still queued.
  Most items are delivered before that and never get a file.
* ``<id>.state`` — JSON with per-recipient results, hold flag and the item's ``extra``,
  replaced atomically (temporary file, fsync, rename, fsync of the directory) after a
  delivery attempt that leaves recipients pending.
* ``<id>.done.<boot>`` — an item that finished after its log record was retired, whose
  deliveries were written without fsync (:meth:`FilesystemStore.defer_sync`): it is unlinked
  after the next checkpoint's sync; after a crash it is removed (same boot: the deliveries
  are in the page cache) or delivered again (an earlier boot: they may be lost).
* ``log/`` — the log segments (``*.seg``) of the running processes, ``log/roots`` the other
  filesystems where deliveries are written without fsync.
* ``.tmp-*`` — half-written files: a write that fails (disk full) removes its own at once;
  those a crash left before rename are removed at start (those older than this process:
  reception workers may be writing newer ones).
* ``corrupt/`` — items that cannot be read are moved here with a log line.
* ``requests/`` — operator requests (``<action>.<id>`` or ``<action>.all``, empty files) from
  ``tampu queue``, served by the running server on SIGUSR1.

When and in which thread these functions run, and how writes are made durable (the queue log,
checkpoints, crash recovery), is the store's: :mod:`tampu.store_files`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tampu.errors import QueueError
from tampu.files import TMP_PREFIX
from tampu.item import QueueItem
from tampu.log_format import write_all
from tampu.store import valid_id

log = logging.getLogger("tampu.queue")  # the store's logger

ITEM_SUFFIX = ".item"
STATE_SUFFIX = ".state"
DONE_INFIX = ".done."
REQUESTS_DIR = "requests"
CORRUPT_DIR = "corrupt"
LOG_DIR = "log"
ACTIONS = ("retry", "delete", "hold", "release")


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
"""``json.dumps`` with a separator argument makes a new encoder per call."""


def item_header(item: QueueItem, size: int) -> bytes:
    """The first line of an item file (without its ``\\n``)."""
    return _ENCODE({**item.header_json(), "size": size}).encode()


def state_body(item: QueueItem) -> bytes:
    """The contents of an item's state file."""
    return _ENCODE(item.state_json()).encode()


def write_item_file(path: Path, chunks: list[bytes]) -> None:
    """Write an item file without fsync (the queue log makes it durable): to
    ``.tmp-<name>``, then renamed; a write that fails removes its temporary file."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, chunks)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def count_items(directory: Path) -> int:
    """Item files in ``directory``, read from disk."""
    try:
        with os.scandir(directory) as it:
            return sum(1 for e in it if e.name.endswith(ITEM_SUFFIX) and e.name[0] != ".")
    except FileNotFoundError:
        return 0


def file_summary(directory: Path) -> tuple[int, float | None]:
    """(item files in ``directory``, the oldest one's modification time or None)."""
    n, oldest = 0, None
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if not entry.name.endswith(ITEM_SUFFIX) or entry.name.startswith("."):
            continue
        try:
            mtime = entry.stat().st_mtime
        except OSError:
            continue  # delivered meanwhile
        n += 1
        oldest = mtime if oldest is None else min(oldest, mtime)
    return n, oldest


def item_ids(directory: Path) -> list[str]:
    """The IDs of the item files in ``directory``, sorted (queue IDs sort by time)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(n[: -len(ITEM_SUFFIX)] for n in names
                  if n.endswith(ITEM_SUFFIX) and not n.startswith("."))


def read_message(path: Path, item_id: str) -> bytes:
    """The message bytes of the item file at ``path`` (after its header line)."""
    try:
        with open(path, "rb") as fh:
            fh.readline()
            return fh.read()
    except FileNotFoundError:
        raise QueueError(f"no queue item {item_id}") from None


def read_item(path: Path, state: Path, item_id: str) -> QueueItem:
    """The item of the item file at ``path``, checked whole (header, ID, size), with its
    state file ``state`` applied when there is a readable one. Raises QueueError."""
    if not valid_id(item_id):
        raise QueueError(f"not a queue ID: {item_id!r}")
    try:
        with open(path, "rb") as fh:
            header = fh.readline()
            total = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        raise QueueError(f"no queue item {item_id}") from None
    except OSError as exc:
        raise QueueError(f"corrupt queue item {item_id}: {exc}") from exc
    item = _item(header, total, item_id)
    try:
        item.apply_state(json.loads(state.read_bytes()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("qid=%s: unreadable state file (%s); resuming from enqueue state",
                    item_id, exc)
    return item


def parse_item(data: bytes, item_id: str) -> QueueItem:
    """The item of an item file's contents ``data``, checked as :func:`read_item` does."""
    end = data.find(b"\n")
    return _item(data[: end + 1] if end >= 0 else data, len(data), item_id)


def _item(header: bytes, total: int, item_id: str) -> QueueItem:
    """The item of an item file whose first line is ``header`` and length ``total``."""
    try:
        fields = json.loads(header)
        item = QueueItem.from_json(fields)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QueueError(f"corrupt queue item {item_id}: {exc}") from exc
    if not header.endswith(b"\n") or item.id != item_id:
        raise QueueError(f"corrupt queue item {item_id}: truncated header")
    size = fields.get("size")
    if isinstance(size, int):
        item.size = size
        if total != len(header) + size:
            raise QueueError(f"corrupt queue item {item_id}: message is "
                             f"{total - len(header)} bytes, expected {size}")
    return item


def done_files(directory: Path, boot: str) -> list[Path]:
    """``.done`` items of this boot (a dead worker's): safe to unlink after a sync."""
    suffix = f"{DONE_INFIX}{boot}"
    try:
        return [directory / n for n in os.listdir(directory) if n.endswith(suffix)]
    except FileNotFoundError:
        return []


def remove_files(paths: tuple[Path, ...]) -> bool:
    """Unlink ``paths`` (no directory fsync); True if any was there."""
    found = False
    for path in paths:
        try:
            os.unlink(path)
            found = True
        except FileNotFoundError:
            pass
    return found


def quarantine(directory: Path, item_id: str, paths: tuple[Path, ...], reason: str) -> None:
    """Move an item's files (``paths``) to ``corrupt/`` with a log line."""
    moved = False
    for path in paths:
        try:
            os.replace(path, directory / CORRUPT_DIR / path.name)
            moved = True
        except FileNotFoundError:
            pass
    if moved:
        log.error("qid=%s: %s; moved to %s", item_id, reason, directory / CORRUPT_DIR)


def corrupt_count(directory: Path) -> int:
    """Items moved to ``corrupt/``."""
    corrupt = directory / CORRUPT_DIR
    return sum(1 for p in corrupt.iterdir() if p.name.endswith(ITEM_SUFFIX)) \
        if corrupt.is_dir() else 0


def write_requests(directory: Path, action: str, ids: list[str]) -> None:
    """Leave operator requests for the running server (``tampu queue``)."""
    if action not in ACTIONS:
        raise QueueError(f"unknown queue action {action!r}")
    rdir = directory / REQUESTS_DIR
    rdir.mkdir(parents=True, exist_ok=True)
    for item_id in ids or ["all"]:
        if item_id != "all" and not valid_id(item_id):
            raise QueueError(f"not a queue ID: {item_id!r}")
        (rdir / f"{action}.{item_id}").touch()


def take_requests(directory: Path) -> list[tuple[str, str]]:
    """The operator requests waiting, oldest first, as ``(action, id or "all")``; their
    files are removed."""
    rdir = directory / REQUESTS_DIR
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
