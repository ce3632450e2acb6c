"""Files: cheap change detection, durable writes, and batched blocking I/O.

* :class:`FileStamp`: ``os.stat`` on every SMTP command adds up; a FileStamp stats its path at
  most once per ``[server] file_check_interval`` (1 s by default), so a change is seen within
  that time.
* :func:`write_durably` (temporary file, fsync, rename, directory fsync), :func:`fsync_dir`,
  :func:`syncfs` (one flush of a whole filesystem).
* :class:`BatchThread`: runs the blocking jobs the event loop hands it in batches (one
  hand-over per loop iteration), with an optional step after each batch (the queue's one
  ``fdatasync``): the group commit. A batch runs on the loop itself while batches are fast
  (``inline``), in one thread of its own otherwise.
* :func:`boot_id`, :func:`process_start`: what tells a process crash (the
  page cache survived) from a power loss, and a live process from a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

log = logging.getLogger("tampu.files")
_T = TypeVar("_T")

TMP_PREFIX = ".tmp-"

Stamp = tuple[int, int, int]


class FileStamp:
    """The (mtime, size, inode) of ``path``, or None when it does not exist; re-read lazily."""

    __slots__ = ("path", "interval", "_checked", "_stamp")

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._checked = float("-inf")
        self._stamp: Stamp | None = None

    def stamp(self) -> Stamp | None:
        now = time.monotonic()
        if now - self._checked >= self.interval:
            try:
                st = os.stat(self.path)
                self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                self._stamp = None
            self._checked = now
        return self._stamp

    def exists(self) -> bool:
        return self.stamp() is not None

    def refresh(self) -> None:
        """Forget the cached stamp: the next call stats again (on reload)."""
        self._checked = float("-inf")


def write_durably(path: Path, chunks: list[bytes], fsync: bool = True, *, mode: int = 0o600,
                  keep_attributes: bool = False) -> None:
    """Write ``chunks`` to ``path`` so that a crash leaves the old file or the whole new one:
    a temporary file, fsync, rename over ``path``, fsync of the directory.

    ``keep_attributes``: a file that exists keeps its mode, owner and group (files an
    administrator manages, such as users files, stay readable by whom they were).
    On any failure the temporary file is removed.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    old: os.stat_result | None = None
    if keep_attributes:
        try:
            old = os.stat(path)
        except FileNotFoundError:
            pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            if old is not None:
                os.fchmod(fd, old.st_mode & 0o7777)
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.fchown(fd, old.st_uid, old.st_gid)
                    except PermissionError:
                        pass  # not root: the file becomes ours, with its old mode
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


UNIX_PATH_MAX = 107
"""Bytes of a UNIX socket path the kernel takes (sun_path is 108 with the NUL)."""


@contextlib.contextmanager
def unix_socket_path(path: Path) -> Iterator[str]:
    """A name for the UNIX socket ``path`` that bind() and connect() accept: the path itself,
    or, when it is too long, the same file through ``/proc/self/fd`` of its directory."""
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- syncfs, boot


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return,unused-ignore]


_SYNCFS = _load_syncfs()
HAVE_SYNCFS = _SYNCFS is not None
"""Linux's syncfs(2): every dirty page and the metadata of one filesystem, in one call."""


def syncfs(path: Path) -> None:
    """Make everything written to the filesystem holding ``path`` durable (syncfs(2); since
    Linux 5.8 it also reports writeback errors). Raises OSError (also when not available)."""
    if _SYNCFS is None:
        raise OSError("syncfs is not available on this system")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def boot_id() -> str:
    """This boot's identifier (Linux; "" elsewhere): a file written by a process that died
    in the same boot is still whole in the page cache, one from an earlier boot may not be."""
    return _read_text("/proc/sys/kernel/random/boot_id").strip().replace("-", "")


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it does not exist
    (or is a zombie). With :func:`boot_id` it names a process for good (PIDs are reused)."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        if not os.path.isdir("/proc/self"):  # no procfs: a signal 0 says whether it exists
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return 0
        return None
    try:
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            return None  # a zombie: dead, not reaped yet
        return int(fields[19])
    except (ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------- BatchThread


class Job(Generic[_T]):
    """One call handed to a :class:`BatchThread`: its result or error once it ran."""

    __slots__ = ("func", "args", "tag", "value", "error", "future", "loop")

    def __init__(self, func: Callable[..., _T], args: tuple[Any, ...], tag: str,
                 future: asyncio.Future[_T], loop: asyncio.AbstractEventLoop) -> None:
        self.func = func
        self.args = args
        self.tag = tag
        self.value: _T | None = None
        self.error: BaseException | None = None
        self.future = future
        self.loop = loop


def drain_into(source: queue.SimpleQueue[list[_T] | None], batch: list[_T]) -> bool:
    """Add every list waiting in ``source`` to ``batch`` (a writer thread's next batch: what
    came meanwhile goes in the same write); True when the stop mark (None) was among them."""
    while True:
        try:
            more = source.get_nowait()
        except queue.Empty:
            return False
        if more is None:
            return True
        batch.extend(more)


INLINE_MAX: Final = sys.getswitchinterval()
"""Seconds the step after a batch may take on the event loop (``BatchThread(inline=True)``)."""
INLINE_RETRY: Final = 10.0
"""Seconds batches go to the thread when inline ones were slow (:data:`SLOW_BATCHES`)."""
SLOW_BATCHES: Final = 4
"""Inline batches of the last 8 whose ``after`` took longer than INLINE_MAX: then the
thread."""
SLOW_WINDOW: Final = 0xFF


class BatchThread:
    """Runs blocking jobs in batches.

    The event loop hands over every job submitted during one loop iteration at once; jobs
    that arrive while a batch runs form the next one. A batch runs its jobs in the order they
    were submitted, then ``after(batch)`` (it may set ``job.error``: the queue's one
    fdatasync for every message of the batch), then the batch's futures are resolved. A job
    whose awaiting task was cancelled still runs (its outcome is dropped).

    Where a batch runs: in the thread (one wake-up of it per batch, one wake-up of the loop
    to resolve). With ``inline``, on the event loop itself while the ``after`` steps (the
    queue's fdatasync: the disk's speed) take less than :data:`INLINE_MAX` (the
    interpreter's switch interval: under load a thread waits about that long for the GIL at
    each system call, so a thread is only faster when the disk is slower); when
    :data:`SLOW_BATCHES` of the last 8 inline batches took longer, the batches of the next
    :data:`INLINE_RETRY` seconds go to the thread. Batches never run at once:
    one lock covers a batch and the ``idle`` step, and a batch whose hand-over finds the
    thread at work goes to the thread, as does a batch with a job submitted with
    ``inline=False``. Batches may finish in another order than they were
    handed over (an inline one before those still in the thread): jobs that depend on one
    another must not be in flight together (the queue's put and remove of an item are not).
    """

    def __init__(self, name: str, after: Callable[[list[Job[Any]]], None] | None = None,
                 *, idle: Callable[[], None] | None = None, idle_every: float = 1.0,
                 inline: bool = False) -> None:
        self.name = name
        self.after = after
        self.idle = idle
        """Called in the thread when it had nothing to do for ``idle_every`` seconds."""
        self.idle_every = idle_every
        self.inline = inline
        self._pending: list[Job[Any]] = []
        self._heavy = False
        """A pending job must not run on the event loop."""
        self._scheduled = False
        self._queue: queue.SimpleQueue[list[Job[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._running = threading.Lock()
        """Held while a batch or the idle step runs (on the loop or in the thread)."""
        self._thread_until = 0.0
        """Monotonic time until which batches go to the thread (inline ones were slow)."""
        self._slow = 0
        """One bit per recent inline batch, set when its ``after`` took longer than INLINE_MAX."""
        self.batches = 0
        """Batches run so far (tests and the benchmark read it)."""
        self.jobs = 0
        self.inline_batches = 0
        """Of those, run on the event loop."""

    def submit(self, func: Callable[..., _T], *args: Any, tag: str = "",  # noqa: ANN401
               inline: bool = True) -> asyncio.Future[_T]:
        """Run ``func(*args)`` in the next batch. ``inline=False``: not on the event loop (a
        big write): the batch goes to the thread."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._pending.append(Job(func, args, tag, future, loop))
        if not inline:
            self._heavy = True
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.hand_over)
        return future

    def hand_over(self) -> None:
        """Run the jobs submitted so far here, or give them to the thread (on the loop;
        submit arranges it)."""
        self._scheduled = False
        batch, self._pending = self._pending, []
        heavy, self._heavy = self._heavy, False
        if not batch:
            return
        self._start()
        if self.inline and not heavy and time.monotonic() >= self._thread_until and \
                self._running.acquire(blocking=False):
            try:
                took = self._run_batch(batch)
            finally:
                self._running.release()
            self.inline_batches += 1
            self._slow = (self._slow << 1 | (took > INLINE_MAX)) & SLOW_WINDOW
            if self._slow.bit_count() >= SLOW_BATCHES:
                self._thread_until = time.monotonic() + INLINE_RETRY
                self._slow = 0
                log.debug("%s: batches take over %.0f ms: they go to the thread for %.0f s",
                          self.name, INLINE_MAX * 1000, INLINE_RETRY)
            _settle(batch)
            return
        self._queue.put(batch)

    def _start(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._queue = queue.SimpleQueue()  # a forked copy's queue may hold a lock
            self._running = threading.Lock()  # ... and so may this one
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                batch = self._queue.get(timeout=self.idle_every) if self.idle else \
                    self._queue.get()
            except queue.Empty:
                try:
                    if self.idle is not None:
                        with self._running:
                            self.idle()
                except Exception:
                    log.exception("%s: idle step failed", self.name)
                continue
            if batch is None:
                return
            stop = drain_into(self._queue, batch)
            with self._running:
                self._run_batch(batch)
            self._resolve(batch)
            if stop:
                return

    def _run_batch(self, batch: list[Job[Any]]) -> float:
        """Run the jobs, then ``after``; the seconds ``after`` took."""
        self.batches += 1
        self.jobs += len(batch)
        for job in batch:
            try:
                job.value = job.func(*job.args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                job.error = exc
        if self.after is None:
            return 0.0
        started = time.monotonic()
        try:
            self.after(batch)
        except BaseException as exc:  # noqa: BLE001
            log.exception("%s: the step after a batch failed", self.name)
            for job in batch:
                if job.error is None:
                    job.error = exc
        return time.monotonic() - started

    @staticmethod
    def _resolve(batch: list[Job[Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Job[Any]]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, jobs)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def close(self, timeout: float = 30.0) -> None:
        """Run what was handed over (:meth:`hand_over` first, on the loop), then end the
        thread (blocking)."""
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None


class ProcessPool:
    """A thread pool made at first use, and again in a forked process."""

    def __init__(self, threads: int, name: str) -> None:
        self.threads, self.name = threads, name
        self._pool: tuple[int, ThreadPoolExecutor] | None = None

    async def run(self, func: Callable[..., _T], *args: object) -> _T:
        """``func(*args)`` in the pool."""
        pool = self._pool
        if pool is None or pool[0] != os.getpid():
            pool = self._pool = (os.getpid(), ThreadPoolExecutor(
                self.threads, thread_name_prefix=self.name))
        return await asyncio.get_running_loop().run_in_executor(pool[1], func, *args)


def _settle(jobs: list[Job[Any]]) -> None:
    for job in jobs:
        future = job.future
        if future.cancelled():
            continue
        if job.error is not None:
            future.set_exception(job.error)
        else:
            future.set_result(job.value)
