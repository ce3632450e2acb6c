"""The queue log: new queue items become durable with one ``fdatasync`` per batch.

The filesystem store appends each new item's bytes as a record to its process's current log
segment; one ``fdatasync`` of the segment (:mod:`tampu.log_sync`) makes a whole batch of
items durable (the group commit: each message's ``250`` is sent after it). The item's own file
is written only when the item outlives its record: when its first delivery attempt leaves
recipients waiting (before their state is written), or when the segment is retired while the
item is still in the queue; an item delivered in the meantime never gets a file. A segment is
retired (deleted) once what it protects is durable by other means: the item files of the
items it still holds are written, then one ``syncfs`` of the queue's filesystem, and of every
other filesystem where deliveries were written without fsync (the *roots*, listed in
:data:`ROOTS_FILE`: a Maildir elsewhere), then the segment is unlinked and the log directory
fsync'd. Segments are retired when they reach :data:`SEGMENT_BYTES` or :data:`SEGMENT_AGE`
seconds, or :data:`IDLE_RETIRE` seconds after their last item left.

Under load a new segment comes ready-made: its file is written full of zeros beforehand (a
*spare*, ``.spare-<owner>-<n>``, made by the checkpoint thread and renamed into place; one
left waiting is removed when the process stops, or a dead process's by the main process's
next checkpoint), so that
the records overwrite blocks that already exist and each ``fdatasync`` writes data only — no
journal commit for a growing file, as PostgreSQL does with its WAL (about half the CPU and
a third of the latency of each sync here). A spare is made only when the segment before, or
the current one, holds at least :data:`SPARE_MIN` bytes, and twice as big as that (up to
:data:`SEGMENT_BYTES`): a quiet server writes no zeros.

The files and records are :mod:`tampu.log_format`'s.

After a crash the main process reads the dead processes' segments
(:func:`tampu.log_format.read_segment`) and
writes back every ``P`` record without a ``D`` (nor, in the same boot, an ``L`` or ``F``)
record whose file is missing or not whole (:mod:`tampu.queue_recovery`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tampu.files import boot_id, fsync_dir, process_start, syncfs, write_durably
from tampu.log_format import (
    DONE,
    FILED,
    LEFT,
    MAGIC,
    PUT,
    ROOTS_FILE,
    SPARE_PREFIX,
    SUFFIX,
    SegmentName,
    read_roots,
    record,
    write_all,
)
from tampu.log_sync import GroupSync
from tampu.store import Durable

log = logging.getLogger("tampu.queue")

SEGMENT_BYTES: Final = 16 * 1024 * 1024
"""A segment this big is sealed and retired (a new one takes the next items)."""
SEGMENT_AGE: Final = 10.0
"""Seconds after which a segment is sealed and retired: after a power loss, deliveries of
about this long are repeated."""
SPARE_MIN: Final = 256 * 1024
"""A segment that held this much (or more) has its successor written with zeros beforehand."""
SPARE_STEP: Final = 1024 * 1024
IDLE_RETIRE: Final = 2.0
"""Seconds after its last item left (and nothing came) that a segment is retired."""
_SEQ = itertools.count(1)
"""Segment numbers, unique in the process (tests run several stores in one process)."""


@dataclass(eq=False)
class Segment:
    path: Path
    fd: int
    size: int
    opened: float
    live: set[str] = field(default_factory=set)
    """Items put in this segment that are still in the queue."""
    state: str = "open"
    """open (takes records), sealed (full: waits for a checkpoint), syncing (being retired)."""
    last: float = 0.0
    """When the last record was appended (monotonic)."""


class QueueLog:
    """The log segments of one process. Records are appended by the store's I/O batches
    (:meth:`add_put`, :meth:`add_done`, :meth:`commit`, :meth:`rotate`: one at a time, on
    the event loop or in the I/O thread); checkpoints run
    in another thread (:meth:`checkpoint`); :meth:`add_root` from any thread."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        """The log directory (``<queue>/log``; made by the store)."""
        self.boot = boot_id()[:16] or "0"
        pid = os.getpid()
        self.owner = f"{self.boot}-{pid}-{process_start(pid) or 0}"
        self.lock = threading.Lock()
        """Guards ``segments``, ``where``, ``roots`` and segment states."""
        self.current: Segment | None = None
        self.segments: list[Segment] = []
        self.where: dict[str, Segment] = {}
        self.roots: dict[int, str] = {}
        """Filesystem (st_dev) -> a directory on it where deliveries were written lazily
        (other than the queue's filesystem, which every checkpoint syncs)."""
        self._roots_lock = threading.Lock()
        self._noted: set[Path] = set()
        """Paths :meth:`add_root` already checked (a stat per delivery is saved)."""
        self._queue_dev: int | None = None
        self._buffer: list[bytes] = []
        self._batch: list[str] = []
        self._then: list[Durable] = []
        self._sync = False
        self._spare: tuple[Path, int] | None = None
        """The next segment's file, written with zeros and synced: (path, fd)."""
        self._used = 0
        """Bytes the last sealed segment held (whether the next one gets a spare)."""
        self.group = GroupSync()
        """Where the batches' fdatasyncs are done (its helper starts at the first wait)."""
        self._syncs = 0

    @property
    def syncs(self) -> int:
        """fdatasync/syncfs/fsync calls made by this log (the benchmark's count)."""
        return self._syncs + self.group.syncs

    # ---------------------------------------------------------------- the I/O batches

    def _head(self) -> bytes:
        return MAGIC + json.dumps({"owner": self.owner}).encode() + b"\n"

    def _open_segment(self) -> Segment:
        seg = self.current
        if seg is not None:
            return seg
        path = self.dir / f"{self.owner}-{next(_SEQ)}{SUFFIX}"
        head = self._head()
        with self.lock:
            spare, self._spare = self._spare, None
        fd = -1
        try:
            if spare is not None:  # written with zeros and synced beforehand
                spare_path, fd = spare
                os.rename(spare_path, path)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                write_all(fd, [head])
            fsync_dir(self.dir)  # the segment's name is durable before it protects anything
            self._syncs += 1
        except BaseException:
            if fd >= 0:
                os.close(fd)
            path.unlink(missing_ok=True)
            if spare is not None:
                spare[0].unlink(missing_ok=True)
            raise
        seg = Segment(path, fd, len(head), time.monotonic())
        with self.lock:
            self.segments.append(seg)
            self.current = seg
        return seg

    def add_put(self, item_id: str, chunks: list[bytes],
                then: Durable | None = None) -> None:
        """Log a new item (its item file's bytes); durable at the next :meth:`commit` or its
        sync (``then`` is called at that moment: :meth:`GroupSync.written`)."""
        seg = self._open_segment()
        self._then += [then] if then is not None else []
        self._buffer.extend(record(PUT, item_id, chunks))
        self._batch.append(item_id)
        self._sync = True
        with self.lock:
            seg.live.add(item_id)
            self.where[item_id] = seg

    def add_filed(self, item_id: str) -> None:
        """Note that an item's file is written (no sync of its own)."""
        if self.current is not None:
            self._buffer.extend(record(FILED, item_id, []))

    def add_done(self, item_id: str, durable: bool = True) -> None:
        """Note that an item left the queue (no sync of its own): after durable deliveries,
        or (``durable=False``) after deliveries that the next retirement makes durable."""
        if self.current is not None:
            self._buffer.extend(record(DONE if durable else LEFT, item_id, []))

    def commit(self) -> int:
        """Write the batch's records; when it holds new items, the number to wait for
        (:meth:`durable`; 0: nothing to wait for). Raises OSError (the batch's items are
        then not in the log: their puts must fail)."""
        seg = self.current
        if not self._buffer or seg is None:
            self._buffer.clear()
            self._batch.clear()
            self._then.clear()
            return 0
        chunks, self._buffer = self._buffer, []
        batch, self._batch = self._batch, []
        sync, self._sync = self._sync, False
        thens, self._then = self._then, []
        seq = 0
        try:
            written = write_all(seg.fd, chunks, seg.size)
            if sync:
                seq = self.group.written(seg.fd, thens)
        except OSError:
            try:
                os.ftruncate(seg.fd, seg.size)  # no damaged record before later ones
            except OSError:
                pass
            with self.lock:
                for item_id in batch:
                    seg.live.discard(item_id)
                    self.where.pop(item_id, None)
            self.seal()  # a segment whose write failed takes no more records
            raise
        seg.size += written
        seg.last = time.monotonic()
        self.rotate()
        return seq

    async def durable(self, item_id: str, seq: int) -> None:
        """Wait for the sync of the batch that logged ``item_id`` (:meth:`commit`'s number).
        When it fails the item is forgotten and the segment sealed (it takes no more
        records); the record may still come back after a crash (twice, never zero times)."""
        try:
            await self.group.wait(seq)
        except OSError:
            self.forget(item_id)
            self.seal()
            raise

    def rotate(self, now: float | None = None) -> bool:
        """Seal the current segment when it is full, old, or idle and empty. True if it
        was sealed (a checkpoint is due)."""
        seg = self.current
        if seg is None:
            return False
        now = time.monotonic() if now is None else now
        with self.lock:
            idle = not seg.live and now - max(seg.last, seg.opened) >= IDLE_RETIRE
        if seg.size >= SEGMENT_BYTES or now - seg.opened >= SEGMENT_AGE or idle:
            self.seal()
            return True
        return False

    def seal(self) -> None:
        with self.lock:
            seg = self.current
            if seg is not None:
                seg.state = "sealed"
                self.current = None
                self._used = seg.size

    # ---------------------------------------------------------------- spares

    def prepare_spare(self) -> None:
        """Write the next segment's file full of zeros and sync it, if the last segment or
        the current one holds :data:`SPARE_MIN` bytes or more and there is no spare yet (the
        checkpoint thread). A failure only means the next segment is made the plain way."""
        with self.lock:
            current = self.current.size if self.current is not None else 0
            used, ready = max(self._used, current), self._spare is not None
        if ready or used < SPARE_MIN:
            return
        size = min(SEGMENT_BYTES, -(-2 * used // SPARE_STEP) * SPARE_STEP)
        path = self.dir / f"{SPARE_PREFIX}{self.owner}-{next(_SEQ)}"
        fd = -1
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            head = self._head()
            zeros = bytes(SPARE_STEP)
            write_all(fd, [head])
            for offset in range(len(head), size, SPARE_STEP):
                write_all(fd, [zeros[:size - offset]], offset)
            os.fsync(fd)
            self._syncs += 1
        except OSError as exc:
            log.debug("queue log: no spare segment: %s", exc.strerror or exc)
            if fd >= 0:
                os.close(fd)
            path.unlink(missing_ok=True)
            return
        with self.lock:
            self._spare, self._used = (path, fd), 0

    def _drop_spare(self) -> None:
        with self.lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            os.close(spare[1])
            spare[0].unlink(missing_ok=True)


    def forget(self, item_id: str) -> bool:
        """An item is leaving. True when its record is in a segment not yet being retired
        (whatever was written for it before now is covered by that segment's checkpoint)."""
        with self.lock:
            seg = self.where.pop(item_id, None)
            if seg is None:
                return False
            seg.live.discard(item_id)
            return seg.state in ("open", "sealed")

    def live(self, segments: list[Segment]) -> list[str]:
        """The items that ``segments`` still hold (a copy)."""
        with self.lock:
            return [item_id for seg in segments for item_id in seg.live]

    # ---------------------------------------------------------------- any thread

    def add_root(self, path: Path) -> None:
        """Deliveries are written without fsync under ``path``: sync its filesystem at each
        checkpoint. A filesystem other than the queue's is also written to
        :data:`ROOTS_FILE` (durably, once), for a process recovering after a crash."""
        if path in self._noted:
            return
        try:
            dev = os.stat(path).st_dev
            if dev == self._dev():
                self._note(path)
                return
        except OSError:
            return
        with self._roots_lock:  # one writer of the file at a time
            with self.lock:
                known = dev in self.roots
            if known:
                self._note(path)
                return
            listed = sorted({*self.roots.values(), str(path), *read_roots(self.dir)})
            write_durably(self.dir / ROOTS_FILE, ["".join(f"{r}\n" for r in listed).encode(
                "utf-8", "surrogateescape")])
            self._syncs += 2
            with self.lock:
                self.roots[dev] = str(path)
        self._note(path)

    def _note(self, path: Path) -> None:
        if len(self._noted) >= 10_000:  # bounded: many users' Maildirs
            self._noted.clear()
        self._noted.add(path)

    def _dev(self) -> int:
        if self._queue_dev is None:
            self._queue_dev = os.stat(self.dir).st_dev
        return self._queue_dev

    # ---------------------------------------------------------------- checkpoints

    def due(self) -> bool:
        with self.lock:
            return any(s.state == "sealed" for s in self.segments)

    def dead_segments(self) -> list[Path]:
        """Segments of processes that are gone (not this one's)."""
        return self._dead()[0]

    def _dead(self) -> tuple[list[Path], list[Path]]:
        """(segments, spares) of processes that are gone: one listing of the folder."""
        segments: list[Path] = []
        spares: list[Path] = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return [], []
        for name in names:
            spare = name.startswith(SPARE_PREFIX)
            seg = SegmentName.parse(name[len(SPARE_PREFIX):] + SUFFIX if spare else name)
            if seg is not None and seg.owner != self.owner and not seg.alive(self.boot):
                (spares if spare else segments).append(self.dir / name)
        return sorted(segments), spares

    def checkpoint(self, *, adopt: bool = False, force: bool = False,
                   before_sync: Callable[[list[Segment], list[Path]], None] | None = None
                   ) -> bool:
        """Retire the sealed segments (and, with ``adopt``, those of dead processes of this
        boot): ``before_sync(segments, foreign)`` (the store writes the item files of what
        they still hold; OSError stops the checkpoint), sync the queue's filesystem and the
        roots, unlink the segments, fsync the queue directory. ``force``: sync even if no
        segment is due (the caller has files to remove after a sync). False when the files
        or the sync failed (nothing was retired)."""
        with self.lock:
            retiring = [s for s in self.segments if s.state == "sealed"]
            for seg in retiring:
                seg.state = "syncing"
            roots = set(self.roots.values())
        foreign, dead_spares = self._dead() if adopt else ([], [])
        for spare in dead_spares:  # never used: removed at once
            spare.unlink(missing_ok=True)
        if foreign:
            roots |= set(read_roots(self.dir))
        if not (retiring or foreign or force):
            return True
        try:
            if before_sync is not None:
                before_sync(retiring, foreign)
            self.sync_roots(roots)
        except OSError as exc:
            log.error("queue log: cannot make the queue durable (%s); the log segments are "
                      "kept", exc.strerror or exc)
            with self.lock:
                for seg in retiring:
                    seg.state = "sealed"
            return False
        for seg in retiring:
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
        for path in foreign:
            log.info("queue log: retired %s of a process that ended", path.name)
            path.unlink(missing_ok=True)
        if retiring or foreign:
            try:
                fsync_dir(self.dir)
                self._syncs += 1
            except OSError as exc:
                log.warning("queue log: cannot fsync %s: %s", self.dir, exc.strerror or exc)
        with self.lock:
            for seg in retiring:
                self.segments.remove(seg)
                for item_id in seg.live:
                    if self.where.get(item_id) is seg:
                        del self.where[item_id]
        return True

    def sync_roots(self, roots: set[str]) -> None:
        """One syncfs per filesystem: the queue's and each root's."""
        seen: set[int] = set()
        for path in [str(self.dir), *sorted(roots)]:
            try:
                dev = os.stat(path).st_dev
            except OSError:
                continue  # a Maildir removed meanwhile: nothing there to sync
            if dev in seen:
                continue
            seen.add(dev)
            syncfs(Path(path))
            self._syncs += 1

    def close(self) -> None:
        """After a final checkpoint: close what is left open (its segments stay)."""
        self._drop_spare()
        with self.lock:
            for seg in self.segments:
                try:
                    os.close(seg.fd)
                except OSError:
                    pass
            self.segments.clear()
            self.current = None
