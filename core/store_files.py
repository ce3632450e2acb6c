"""The filesystem queue store (the embedded default): a log that makes new items durable in
batches, then a file per item that outlives its log record, and one per state. The layout of
``<data_dir>/queue/``: :mod:`tampu.queue_files`; the log: :mod:`tampu.queue_log`; crash
recovery: :mod:`tampu.queue_recovery`.

New items and removals go in batches (:class:`BatchThread`: one hand-over per event-loop
iteration) to the event loop itself while a batch takes less than the interpreter's switch
interval (5 ms), and to one I/O thread per process when the disk is slower or a message is
big (:data:`INLINE_BYTES`); the batches' ``fdatasync`` is done by a helper process
(:mod:`tampu.log_sync`), each put waiting for the one that covers it. States, reads, loads and
recovery run in a small pool of their own (:data:`QUEUE_THREADS`), so that a busy delivery
loop never makes a client's ``DATA`` wait for a thread. Without ``syncfs`` (not Linux) or
with ``fsync=False`` there is no log: each item file is written durably on its own (fsync,
rename, directory fsync).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Final

from tampu import queue_files, queue_recovery
from tampu.errors import QueueError
from tampu.files import (
    HAVE_SYNCFS,
    BatchThread,
    Job,
    ProcessPool,
    boot_id,
    fsync_dir,
    write_durably,
)
from tampu.item import QueueItem
from tampu.log_format import SegmentName
from tampu.queue_files import CORRUPT_DIR, DONE_INFIX, ITEM_SUFFIX, LOG_DIR, STATE_SUFFIX
from tampu.queue_log import QueueLog
from tampu.store import ON_DURABLE, Durable, new_queue_id, valid_id

log = logging.getLogger("tampu.queue")

CHECKPOINT_POLL = 1.0
"""Seconds between the checkpoint thread's looks at the log when nothing pokes it."""
INLINE_BYTES: Final = 256 * 1024
"""A message bigger than this is written by the I/O thread, never on the event loop (its
write and fdatasync could hold up every session of the process)."""
QUEUE_THREADS = 8
"""Threads of the delivery side's queue I/O (one pool per process, made at first use)."""
_NO_NAME = SegmentName("", 0, 0, 0)
_in_queue_thread = ProcessPool(QUEUE_THREADS, "tampu-queue").run


class FilesystemStore:
    """The queue directory. Safe across the processes of one server (reception workers)."""

    def __init__(self, directory: Path, max_items: int, fsync: bool = True) -> None:
        self.dir = directory
        self.max_items = max_items
        self.fsync = fsync
        self._ready = False
        self._estimate = 0
        self._counted_at = -1.0
        self.logged = fsync and HAVE_SYNCFS
        """New items are made durable by the queue log (else each by its own fsyncs)."""
        self._log: QueueLog | None = None
        self._io: BatchThread | None = None
        self._checkpointer: threading.Thread | None = None
        self._poke = threading.Event()
        self._closing = False
        self._lock = threading.Lock()
        self._lazy: set[str] = set()
        """Items with deliveries written without fsync (:meth:`defer_sync`)."""
        self._done: list[str] = []
        """Finished items renamed to ``.done``, unlinked after the next checkpoint's sync."""
        self._adopt = False
        """Retire the log segments of dead processes (the main process, after recover)."""
        self._boot = ""
        self._unfiled: dict[str, tuple[list[bytes], float]] = {}
        """Items whose bytes are only in the log (and here): ID -> (item file chunks, when
        put). Guarded by ``_filing``, held while one is written out or removed."""
        self._filing = threading.Lock()
        self._replay_dead = queue_recovery.ReplayOnce()
        self._elsewhere = queue_recovery.LoggedElsewhere(directory / LOG_DIR, self.item_path)

    new_id = staticmethod(new_queue_id)

    def prepare(self) -> None:
        """Make the queue directories (at start and before the first write)."""
        if not self._ready:
            (self.dir / CORRUPT_DIR).mkdir(parents=True, exist_ok=True)
            if self.logged and not (self.dir / LOG_DIR).is_dir():
                (self.dir / LOG_DIR).mkdir(exist_ok=True)
                fsync_dir(self.dir)  # before a segment in it protects anything
            self._ready = True

    def item_path(self, item_id: str) -> Path:
        return self.dir / f"{item_id}{ITEM_SUFFIX}"

    def state_path(self, item_id: str) -> Path:
        return self.dir / f"{item_id}{STATE_SUFFIX}"

    def count(self) -> int:
        """Items in the queue directory (all processes), read from disk, and this process's
        items still only in the log."""
        return queue_files.count_items(self.dir) + len(self._unfiled) + len(
            self._logged_elsewhere())

    def full(self) -> bool:
        """A directory scan at most every 0.5 s, or when the estimate is close to the cap."""
        now = time.monotonic()
        if now - self._counted_at > 0.5 or self._estimate >= self.max_items * 0.8:
            self._estimate = self.count()
            self._counted_at = now
        return self._estimate >= self.max_items

    def ids_now(self) -> list[str]:
        """The queued items: the item files and this process's items only in the log."""
        files = queue_files.item_ids(self.dir)
        elsewhere = self._logged_elsewhere()
        with self._filing:
            unfiled = [*self._unfiled, *elsewhere]
        return sorted({*files, *unfiled}) if unfiled else files

    def _logged_elsewhere(self) -> dict[str, bytes]:
        """For a store that writes no log of its own (``tampu queue``): the items that other
        processes hold only in their log segments so far (ID -> item file bytes)."""
        return {} if self._log is not None or not self.logged else self._elsewhere()

    async def ids(self) -> list[str]:
        if self._adopt:  # a worker that died may have left items only in its log
            await _in_queue_thread(self._file_dead)
        return self.ids_now()

    async def exists(self, item_id: str) -> bool:
        return valid_id(item_id) and (item_id in self._unfiled
                                      or self.item_path(item_id).exists()
                                      or item_id in self._logged_elsewhere())

    def summary(self) -> tuple[int, float | None]:
        """(items, when the oldest was queued or None) of the whole queue, for metrics: the
        item files' modification times and this process's items only in the log."""
        n, oldest = queue_files.file_summary(self.dir)
        with self._filing:
            times = [put for _, put in self._unfiled.values()]
        if times:
            n += len(times)
            oldest = min(times) if oldest is None else min(oldest, *times)
        return n, oldest

    # ------------------------------------------------------------------ writing

    def _thread(self) -> BatchThread:
        """The I/O thread of this store (made at first use, again in a forked process)."""
        io = self._io
        if io is None:
            self.prepare()
            self._log = QueueLog(self.dir / LOG_DIR)
            self._boot = self._log.boot
            io = self._io = BatchThread("tampu-queue-io", after=self._commit,
                                        idle=self._idle, idle_every=CHECKPOINT_POLL,
                                        inline=True)
            self._checkpointer = threading.Thread(target=self._checkpoints, daemon=True,
                                                  name="tampu-queue-checkpoint")
            self._checkpointer.start()
        return io

    async def put(self, item: QueueItem, message: bytes) -> None:
        self.prepare()
        item.size = len(message)
        header = queue_files.item_header(item, len(message))
        if self.logged:
            seq = await self._thread().submit(self._put_logged, item.id, header, message,
                                              ON_DURABLE.get(), tag="put",
                                              inline=len(message) <= INLINE_BYTES)
            try:
                if seq and self._log is not None:
                    await self._log.durable(item.id, seq)
            except OSError as exc:  # no 250, no delivery
                log.error("queue log: cannot sync %s: %s", self.dir, exc.strerror or exc)
                with self._filing:
                    self._unfiled.pop(item.id, None)
                raise
        else:
            await asyncio.to_thread(write_durably, self.item_path(item.id),
                                    [header, b"\n", message], self.fsync)
        self._estimate += 1

    def _put_logged(self, item_id: str, header: bytes, message: bytes,
                    told: Durable | None) -> int:
        """In a queue I/O batch: the log record (the item file waits: :meth:`_file`); the
        batch's sync number (set by :meth:`_commit`). ``told``: :data:`ON_DURABLE`."""
        assert self._log is not None
        chunks = [header, b"\n", message]
        self._log.add_put(item_id, chunks, told if told and told.item_id == item_id else None)
        with self._filing:
            self._unfiled[item_id] = (chunks, time.time())
        return 0

    def _file(self, item_id: str) -> None:
        """Write the file of an item that is only in the log (no fsync: the log protects it
        until a checkpoint's sync). Raises OSError (the item stays in the log then)."""
        with self._filing:
            entry = self._unfiled.pop(item_id, None)
            if entry is None:
                return
            try:
                queue_files.write_item_file(self.item_path(item_id), entry[0])
            except OSError:
                self._unfiled[item_id] = entry
                raise

    def _file_retiring(self, segments: list[Any], foreign: list[Path]) -> None:
        """Before a checkpoint's sync: the files of the items that the segments being
        retired (this process's, and ``foreign`` ones of dead processes) still hold."""
        assert self._log is not None
        for item_id in self._log.live(segments):
            self._file(item_id)
        if foreign:
            self._file_dead(foreign)

    def _file_dead(self, segments: list[Path] | None = None) -> None:
        """Write back the items that dead processes of this boot left only in their log."""
        assert self._log is not None
        self._replay_dead(self._log, self.item_path, self.remove_now, segments)

    def _commit(self, batch: list[Job[Any]]) -> None:
        """After each queue I/O batch: one write of the log (its sync: :meth:`put`). When
        that fails, the batch's new items fail too (forgotten: no 250, no delivery)."""
        assert self._log is not None
        try:
            seq = self._log.commit()
        except OSError as exc:
            log.error("queue log: cannot write %s: %s", self.dir, exc.strerror or exc)
            for job in batch:
                if job.tag == "put" and job.error is None:
                    job.error = exc
                    with self._filing:
                        self._unfiled.pop(job.args[0], None)
            return
        if seq:
            for job in batch:
                if job.tag == "put" and job.error is None:
                    job.value = seq
        if self._log.due():
            self._poke.set()

    def _idle(self) -> None:
        """The I/O thread had nothing to do for a while: retire an idle segment."""
        if self._log is not None and self._log.rotate():
            self._poke.set()

    def defer_sync(self, item_id: str, path: Path) -> bool:
        """For delivery backends writing files (any thread): True when this store takes
        care of making what is written under ``path`` for ``item_id`` durable — before the
        item leaves the queue for good, and before a state that says it was delivered is
        written — so that the backend need not fsync. False: sync yourself."""
        if not self.logged:
            return False
        self._thread()
        assert self._log is not None
        try:
            self._log.add_root(path)
        except OSError as exc:
            log.warning("queue log: cannot note %s (%s); deliveries there are synced one "
                        "by one", path, exc.strerror or exc)
            return False
        with self._lock:
            self._lazy.add(item_id)
        return True

    async def save_state(self, item: QueueItem) -> None:
        if not await self.exists(item.id):
            return  # deleted by an operator
        unfiled = self._unfiled.get(item.id)
        if unfiled is not None:  # a state is only ever beside its item's file
            await self._thread().submit(self._file_logged, item.id, tag="file",
                                        inline=len(unfiled[0][2]) <= INLINE_BYTES)
        body = queue_files.state_body(item)
        await _in_queue_thread(self._save_state_now, item.id, body)

    def _file_logged(self, item_id: str) -> None:
        """In a queue I/O batch: the item's file, and an ``F`` record (after a crash the
        file is the item: it may be handed to the main process, delivered and removed)."""
        assert self._log is not None
        self._file(item_id)
        self._log.add_filed(item_id)

    def _save_state_now(self, item_id: str, body: bytes) -> None:
        with self._lock:
            lazy = item_id in self._lazy
        if lazy and self._log is not None:  # what the state says was delivered is on disk
            self._log.sync_roots(set(self._log.roots.values()))
            with self._lock:
                self._lazy.discard(item_id)
        write_durably(self.state_path(item_id), [body], self.fsync)

    async def remove(self, item: QueueItem) -> None:
        if self.logged:
            await self._thread().submit(self._remove_logged, item.id, tag="remove")
        else:
            await _in_queue_thread(self.remove_now, item.id)
        self._estimate = max(0, self._estimate - 1)

    def _remove_logged(self, item_id: str) -> None:
        """In a queue I/O batch. An item whose log record is still to be retired goes at once
        (that retirement's sync covers what was delivered for it; a ``D`` or ``L`` record
        says it left); one delivered lazily after its record was retired waits as ``.done``
        for the next checkpoint."""
        assert self._log is not None
        with self._lock:
            lazy = item_id in self._lazy
            self._lazy.discard(item_id)
        fresh = self._log.forget(item_id)
        with self._filing:
            entry = self._unfiled.pop(item_id, None)
            if lazy and not fresh:
                try:
                    if entry is not None:
                        queue_files.write_item_file(self.done_path(item_id), entry[0])
                    else:
                        os.rename(self.item_path(item_id), self.done_path(item_id))
                except FileNotFoundError:
                    return
                with self._lock:
                    self._done.append(item_id)
                self._poke.set()
                return
            self._log.add_done(item_id, durable=not lazy)
            if entry is None:
                queue_files.remove_files((self.state_path(item_id), self.item_path(item_id)))

    def done_path(self, item_id: str, boot: str = "") -> Path:
        return self.dir / f"{item_id}{DONE_INFIX}{boot or self._boot or boot_id()[:16]}"

    def remove_now(self, item_id: str) -> bool:
        """Remove an item's files, or forget it if it has none yet (no directory fsync, no
        log record: an item that reappears after a crash is delivered again). True if the
        item was there."""
        with self._filing:
            unfiled = self._unfiled.pop(item_id, None) is not None
        return queue_files.remove_files(
            (self.state_path(item_id), self.item_path(item_id))) or unfiled

    # ------------------------------------------------------------------ checkpoints

    def _checkpoints(self) -> None:
        """The checkpoint thread: retire sealed log segments (and the segments of dead
        processes, in the main process); unlink ``.done`` items after the sync."""
        while True:
            self._poke.wait(CHECKPOINT_POLL)
            self._poke.clear()
            if self.closing():
                return
            try:
                self.checkpoint()
                if self._log is not None:
                    self._log.prepare_spare()
            except Exception:
                log.exception("queue log: checkpoint failed")

    def checkpoint(self) -> None:
        log_ = self._log
        if log_ is None:
            return
        with self._lock:
            done, self._done = self._done, []
        adopt = self._adopt
        others = queue_files.done_files(self.dir, self._boot) \
            if adopt and log_.dead_segments() else []
        if not log_.checkpoint(adopt=adopt, force=bool(done or others),
                               before_sync=self._file_retiring):
            with self._lock:
                self._done[:0] = done
            return
        for item_id in done:
            self.state_path(item_id).unlink(missing_ok=True)
            self.done_path(item_id).unlink(missing_ok=True)
        for path in others:
            path.unlink(missing_ok=True)
            self.state_path(path.name.split(".", 1)[0]).unlink(missing_ok=True)

    def closing(self) -> bool:
        return self._closing

    async def close(self) -> None:
        """At shutdown: finish the pending writes, retire every log segment of this process
        (so that nothing is repeated after a later power loss), stop the threads."""
        io = self._io
        if io is None:
            return
        io.hand_over()
        group = self._log.group if self._log is not None else None
        if group is not None:
            await group.drain()
        await asyncio.to_thread(self._close_now)
        if group is not None:
            group.close()  # on the loop: it stops watching the helper's socket

    def _close_now(self) -> None:
        io = self._io
        if io is None:
            return
        io.close()
        self._closing = True
        self._poke.set()
        if self._checkpointer is not None:
            self._checkpointer.join(30)
        if self._log is not None:
            self._log.seal()
            self.checkpoint()
            self._log.close()
        self._io = None
        self._log = None
        self._closing = False

    # ------------------------------------------------------------------ reading

    async def read_message(self, item_id: str) -> bytes:
        return await _in_queue_thread(self.read_message_now, item_id)

    def _only_logged(self, item_id: str) -> bytes | None:
        """The item file's bytes of an item that has no file yet: this process's, or one
        another process holds only in its log; None when it has a file (or is unknown)."""
        entry = self._unfiled.get(item_id)
        if entry is not None:
            return b"".join(entry[0])
        elsewhere = self._logged_elsewhere()
        if elsewhere and not self.item_path(item_id).exists():
            return elsewhere.get(item_id)
        return None

    def read_message_now(self, item_id: str) -> bytes:
        data = self._only_logged(item_id)
        if data is not None:
            return data.partition(b"\n")[2]
        return queue_files.read_message(self.item_path(item_id), item_id)

    async def load(self, item_id: str) -> QueueItem:
        return await _in_queue_thread(self.load_now, item_id)

    def load_now(self, item_id: str) -> QueueItem:
        data = self._only_logged(item_id)
        if data is not None:  # no state yet: one is written only beside the file
            return queue_files.parse_item(data, item_id)
        return queue_files.read_item(self.item_path(item_id), self.state_path(item_id), item_id)

    def item_bytes_now(self, item_id: str) -> bytes:
        """The item file's contents (header line, ``\\n``, message) as queued, whether
        its file is written yet or not. Raises QueueError."""
        data = self._only_logged(item_id)
        if data is not None:
            return data
        try:
            return self.item_path(item_id).read_bytes()
        except FileNotFoundError:
            raise QueueError(f"no queue item {item_id}") from None

    async def recover(self) -> list[str]:
        return await _in_queue_thread(self._recover)

    def _recover(self) -> list[str]:
        """After a crash (:mod:`tampu.queue_recovery`); the IDs, oldest first. Items are not
        read here: the delivery loop loads them as it gets to them. From now on this store
        also retires the segments of dead processes."""
        self.prepare()
        if self.logged:
            self._thread()
            assert self._log is not None
            queue_recovery.recover_log(self._log, self.dir, self.item_path, self.state_path,
                                       self.remove_now)
            self._adopt = True
        queue_recovery.remove_leftovers(self.dir, self.item_path)
        ids = self.ids_now()  # queue IDs sort by time: oldest first
        self._estimate = len(ids)
        return ids

    async def quarantine(self, item_id: str, reason: str) -> None:
        await _in_queue_thread(self.quarantine_now, item_id, reason)

    def quarantine_now(self, item_id: str, reason: str) -> None:
        self._file(item_id)
        queue_files.quarantine(self.dir, item_id,
                               (self.item_path(item_id), self.state_path(item_id)), reason)

    def corrupt_count(self) -> int:
        return queue_files.corrupt_count(self.dir)

    # ------------------------------------------------------------------ operator requests

    async def request(self, action: str, ids: list[str]) -> None:
        queue_files.write_requests(self.dir, action, ids)

    async def take_requests(self) -> list[tuple[str, str]]:
        return queue_files.take_requests(self.dir)
