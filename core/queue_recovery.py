"""The filesystem queue after a crash: what the log segments of processes that are gone
hold is written back as item files (:mod:`tampu.queue_log` has the records' meaning).

:func:`recover_log` and :func:`remove_leftovers` run once in the main process at start
(:meth:`FilesystemStore.recover`); :func:`replay` also when a reception worker died, before
its items are taken over (:class:`ReplayOnce`); :func:`logged_only` is the view of another
process (``tampu queue``) of the items that running servers hold only in their log so far.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tampu import queue_files
from tampu.files import TMP_PREFIX, boot_id, fsync_dir, write_durably
from tampu.log_format import SegmentName, read_roots, read_segment
from tampu.queue_files import DONE_INFIX, STATE_SUFFIX
from tampu.queue_log import QueueLog
from tampu.store import valid_id

log = logging.getLogger("tampu.queue")  # the store's logger

OBSERVE_EVERY: Final = 1.0
"""Seconds a store that writes no log keeps what it read of the others' log segments."""
_PROCESS_START = time.time()
"""Before any reception worker forks: older ``.tmp-*`` files are leftovers of a crash."""


@dataclass
class Logged:
    """What a set of segments says, merged (:func:`read_logged`)."""

    puts: dict[str, bytes] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    """Items that left: ``D``, and ``L`` in a segment of this boot."""
    filed: set[str] = field(default_factory=set)
    """Items whose file is the item (``F``, this boot)."""
    earlier: int = 0
    """Segments of an earlier boot (a power loss) among them."""

    def pending(self) -> dict[str, bytes]:
        """The items still only in the log: put, not gone, not filed."""
        return {qid: data for qid, data in self.puts.items()
                if qid not in self.gone and qid not in self.filed and valid_id(qid)}


def read_logged(segments: list[Path], boot: str, *, quiet: bool = False) -> Logged:
    """The records of ``segments`` merged; ``boot``: this boot's ID (``L`` and ``F`` count
    only in its segments: the page cache survived). A segment that cannot be read is
    skipped (logged unless ``quiet``)."""
    out = Logged()
    for path in segments:
        try:
            contents = read_segment(path)
        except OSError as exc:
            if not quiet:
                log.error("queue log: cannot read %s: %s", path, exc.strerror or exc)
            continue
        out.puts.update(contents.puts)
        out.gone |= contents.done
        name = SegmentName.parse(path.name)
        if name is not None and name.boot == boot:
            out.gone |= contents.left
            out.filed |= contents.filed
        else:
            out.earlier += 1
    return out


def logged_only(log_dir: Path, item_path: Callable[[str], Path]) -> dict[str, bytes]:
    """Every segment's items that have no item file yet (ID -> item file bytes)."""
    try:
        names = sorted(n for n in os.listdir(log_dir) if SegmentName.parse(n) is not None)
    except FileNotFoundError:
        return {}
    logged = read_logged([log_dir / n for n in names], boot_id()[:16] or "0", quiet=True)
    return {qid: data for qid, data in logged.pending().items()
            if not item_path(qid).exists()}


class LoggedElsewhere:
    """:func:`logged_only` of a queue's log directory, read at most every
    :data:`OBSERVE_EVERY` seconds."""

    def __init__(self, log_dir: Path, item_path: Callable[[str], Path]) -> None:
        self.log_dir = log_dir
        self.item_path = item_path
        self._seen: tuple[float, dict[str, bytes]] | None = None

    def __call__(self) -> dict[str, bytes]:
        now = time.monotonic()
        if self._seen is None or now - self._seen[0] >= OBSERVE_EVERY:
            self._seen = (now, logged_only(self.log_dir, self.item_path))
        return self._seen[1]


def replay(segments: list[Path], boot: str, item_path: Callable[[str], Path],
           remove: Callable[[str], object], *, durable: bool) -> None:
    """Segments of processes that are gone: every item put and not reported gone (``D``;
    ``L`` too in a segment of this boot: the page cache kept its deliveries) nor filed
    (``F``, this boot: its file is the item) is written back where its file is missing or
    not whole (``durable``: with fsync; else the sync that retires the segments covers
    it). ``boot``: this boot's ID; ``remove(id)``: forget an item that left."""
    logged = read_logged(segments, boot)
    for item_id in logged.gone:  # its deliveries are safe: a file that is back lost its unlink
        if valid_id(item_id):
            remove(item_id)
    restored = 0
    for item_id, data in logged.pending().items():
        path = item_path(item_id)
        try:
            if path.read_bytes() == data:
                continue
        except FileNotFoundError:
            pass
        if durable:
            write_durably(path, [data])
        else:
            queue_files.write_item_file(path, [data])
        restored += 1
    if logged.earlier:
        log.warning("queue log: the machine restarted since the last run: %d item(s) of %d "
                    "logged restored from the log (delivered again if they were already)",
                    restored, len(logged.puts))
    elif restored:
        log.info("queue log: %d item(s) of a process that ended restored from its log",
                 restored)


class ReplayOnce:
    """Writes back the items of dead processes' segments while this process runs (a worker
    died), each segment once: its items may be delivered and gone since."""

    def __init__(self) -> None:
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, log_: QueueLog, item_path: Callable[[str], Path],
                 remove: Callable[[str], object], segments: list[Path] | None = None) -> None:
        """``segments`` (default: every dead process's) not written back before."""
        with self._lock:
            todo = [p for p in (log_.dead_segments() if segments is None else segments)
                    if p.name not in self._done]
            if todo:
                replay(todo, log_.boot, item_path, remove, durable=False)
                self._done.update(p.name for p in todo)


def remove_leftovers(directory: Path, item_path: Callable[[str], Path]) -> None:
    """At start: ``.tmp-*`` files older than this process (half-written when a process
    crashed) and states whose item is gone."""
    for entry in list(directory.iterdir()):
        if entry.name.startswith(TMP_PREFIX):
            try:
                if entry.stat().st_mtime >= _PROCESS_START:
                    continue  # being written right now by a reception worker
            except FileNotFoundError:
                continue
            log.warning("removing half-written queue file %s", entry.name)
            entry.unlink(missing_ok=True)
        elif entry.name.endswith(STATE_SUFFIX) and not item_path(
                entry.name[: -len(STATE_SUFFIX)]).exists() and not any(
                directory.glob(f"{entry.name[: -len(STATE_SUFFIX)]}{DONE_INFIX}*")):
            entry.unlink(missing_ok=True)  # its item is gone (a state is written after)


def recover_log(log_: QueueLog, directory: Path, item_path: Callable[[str], Path],
                state_path: Callable[[str], Path], remove: Callable[[str], object]) -> None:
    """At start: the log segments and ``.done`` items of processes that are gone (written
    back, synced, retired)."""
    dead = log_.dead_segments()
    done_now: list[Path] = []
    for entry in list(os.scandir(directory)):
        item_id, infix, when = entry.name.partition(DONE_INFIX)
        if not infix or not valid_id(item_id):
            continue
        if when == log_.boot:
            done_now.append(Path(entry.path))  # its deliveries are in the page cache
        else:  # from an earlier boot: the deliveries may be lost; deliver again
            log.warning("qid=%s: finished before a restart of the machine; delivered "
                        "again (its deliveries may not have reached the disk)", item_id)
            os.replace(entry.path, item_path(item_id))
    if dead:
        replay(dead, log_.boot, item_path, remove, durable=True)
    if not (dead or done_now):
        return
    try:
        log_.sync_roots(set(read_roots(log_.dir)))
    except OSError as exc:
        log.error("queue log: cannot sync the queue's filesystem (%s); the log segments "
                  "of the last run are kept", exc.strerror or exc)
        return
    for path in done_now:
        path.unlink(missing_ok=True)
        state_path(path.name.split(".", 1)[0]).unlink(missing_ok=True)
    for path in dead:
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        fsync_dir(log_.dir)
    if dead:
        log.info("queue log: %d segment(s) of the last run retired", len(dead))
