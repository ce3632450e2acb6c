"""Several processes on the same listeners (``[server] workers = N``).

The main process and N-1 forked workers each run a full server: reception and a delivery
runner. Every process binds its own listening sockets with SO_REUSEPORT, so the kernel spreads
connections over them, and each process delivers what it queued — its first rounds, with the
message bytes still in memory: no hand-over per message. Who queued an item is in its queue ID
(each process gets its own 3-byte prefix before the fork, :func:`tampu.store.set_id_prefix`).
An item that must wait for a retry is handed to the main process over a pipe (its state is
already durable), which then owns it: the main process makes every later round, resumes the
queue at start (without the items of live workers) and serves operator requests. When a
worker dies, the main process learns it at once (a pidfd per worker) and takes over the items
whose IDs carry that worker's prefix; the filesystem store of the main process retires the
dead worker's log segments at its next checkpoint (:mod:`tampu.queue_log`).
SIGTERM/SIGINT/SIGHUP given to the main process are passed on to the workers.

Start-up is all or nothing: every process builds its configuration and runs its start-up
hooks with its sockets bound but not listening, then reports ``ready`` (or ``failed``) to the
main process. Only when every worker and the main process itself are ready does the main
process send each worker its go-ahead; then they all listen. If any of them fails, is stopped
(SIGTERM) or dies during start-up, no process ever accepts a connection: the workers get no
go-ahead (their start pipe is closed) and stop, and the main process stops too. A worker
whose main process is gone at any time stops (PR_SET_PDEATHSIG, and the closed pipes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tampu.backends import SharedQueueStore
from tampu.config import Config
from tampu.item import QueueItem
from tampu.store import ID_PREFIX_BYTES, id_prefix, set_id_prefix

if TYPE_CHECKING:
    from tampu.server import Server

log = logging.getLogger("tampu.workers")

_READY = b"!ready "
_FAILED = b"!failed "
_HAND = b"!hand "
_GO = b"g"
_INDEX = 0


def current_worker() -> int:
    """0 in the main process (or without workers), 1..N-1 in a reception worker."""
    return _INDEX


def startup_timeout(config: Config) -> float:
    """Seconds the main process waits for every worker to be ready."""
    return max(60.0, 2 * config.server.plugin_timeout)


@dataclass
class Workers:
    """The main process's view of its reception workers."""

    pids: list[int]
    rfd: int | None
    """Read end of the pipe on which workers report start-up and new queue items."""
    go: dict[int, int] = field(default_factory=dict)
    """Worker index -> write end of its start pipe (closed once it got its go-ahead)."""
    ready: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    exited: dict[int, int] = field(default_factory=dict)
    """PID -> wait status of workers that ended (and were reaped)."""
    failure: str = ""
    """Why start-up was abandoned ("" when it was not)."""
    prefixes: dict[int, bytes] = field(default_factory=dict)
    """PID -> the queue-ID prefix of that worker."""
    live: set[bytes] = field(default_factory=set)
    """The prefixes of the workers running now: their items are theirs to deliver."""

    def owned_by_a_worker(self, item_id: str) -> bool:
        return bool(self.live) and id_prefix(item_id) in self.live

    @property
    def count(self) -> int:
        return len(self.pids)

    def _check_exits(self) -> None:
        for pid in self.pids:
            if pid in self.exited:
                continue
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.exited[pid] = status
                self.live.discard(self.prefixes.get(pid, b""))

    async def all_ready(self, within: float) -> bool:
        """Wait until every worker reported ready; False (``failure`` says why) when one
        failed, ended or did not report within ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            if self.failed:
                index, why = next(iter(self.failed.items()))
                self.failure = f"reception worker {index} failed to start: {why}"
                return False
            self._check_exits()
            if self.exited:
                pid, status = next(iter(self.exited.items()))
                self.failure = f"reception worker (pid {pid}) ended during start-up " \
                    f"({_describe(status)})"
                return False
            if len(self.ready) == self.count:
                return True
            if time.monotonic() >= deadline:
                late = sorted(set(range(1, self.count + 1)) - self.ready)
                self.failure = f"reception workers {late} not ready after {within:.0f}s"
                return False
            await asyncio.sleep(0.02)

    def release(self) -> None:
        """Give every worker its go-ahead."""
        for index, fd in list(self.go.items()):
            try:
                os.write(fd, _GO)
            except OSError:  # it ended meanwhile: the main process notices later
                pass
            os.close(fd)
            del self.go[index]

    def abandon(self) -> None:
        """No go-ahead for anyone: close the start pipes (waiting workers stop)."""
        for fd in self.go.values():
            os.close(fd)
        self.go.clear()

    def signal_all(self, sig: signal.Signals) -> None:
        for pid in self.pids:
            if pid in self.exited:
                continue
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """At the main process's end, however it ends: stop the workers and wait for them
        (those still running after ``timeout`` are killed)."""
        self.abandon()
        self.signal_all(signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._check_exits()
            if len(self.exited) == self.count:
                break
            time.sleep(0.02)
        for pid in self.pids:
            if pid not in self.exited:
                log.warning("reception worker %d did not stop; killed", pid)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                self.exited[pid] = -1
        if self.rfd is not None:
            try:
                os.close(self.rfd)
            except OSError:
                pass
            self.rfd = None


def _describe(status: int) -> str:
    if status < 0:
        return "killed"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def fork_workers(config: Config, count: int) -> Workers:
    """Fork ``count`` reception workers. Must be called before any event loop exists. In a
    worker this function does not return: the worker serves until stopped and exits."""
    if count <= 0:
        return Workers([], None)
    rfd, wfd = os.pipe()
    workers = Workers([], rfd)
    prefixes: list[bytes] = []
    while len(prefixes) < count + 1:  # one per process, all different
        candidate = os.urandom(ID_PREFIX_BYTES)
        if candidate not in prefixes:
            prefixes.append(candidate)
    for index in range(1, count + 1):
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # Until its event loop handles them: SIGTERM ends a worker at once (nothing
                # is served yet, and the main process then gives up the start-up), SIGINT (a
                # terminal's ^C, which the main process gets too) is for the main process.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                _die_with_parent()
                os.close(rfd)
                os.close(go_w)
                for other in workers.go.values():  # the start pipes of the other workers
                    os.close(other)
                set_id_prefix(prefixes[index])
                code = _worker_main(config, wfd, go_r, index)
            except BaseException:
                log.exception("reception worker %d failed", index)
            finally:
                os._exit(code)
        os.close(go_r)
        workers.pids.append(pid)
        workers.go[index] = go_w
        workers.prefixes[pid] = prefixes[index]
        workers.live.add(prefixes[index])
    os.close(wfd)
    set_id_prefix(prefixes[0])
    return workers


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the main process dies (even by SIGKILL), so no orphan
    worker keeps accepting mail that nobody would deliver until the next start."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pipe check in notify() still applies
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


def _report(wfd: int, line: bytes) -> bool:
    try:
        os.write(wfd, line[:400] + b"\n")  # one write under PIPE_BUF: never interleaved
        return True
    except OSError:
        return False


async def _wait_go(go_fd: int) -> bool:
    """The main process's go-ahead (True), or its refusal or end (False)."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(go_fd, 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not got.done():
            got.set_result(data)

    os.set_blocking(go_fd, False)
    loop.add_reader(go_fd, readable)
    try:
        return await got == _GO
    finally:
        loop.remove_reader(go_fd)


def _worker_main(config: Config, wfd: int, go_fd: int, index: int) -> int:
    global _INDEX
    _INDEX = index
    from tampu.server import Server

    async def run() -> int:
        try:
            server = Server(config, resume=False)
            server.bind(reuse_port=True, listen=False, local_socket=False)
            if isinstance(server.state.runtime.store, SharedQueueStore):
                server.deliver = False  # the main process claims for the node, under leases
        except Exception as exc:
            log.error("reception worker %d: %s", index, exc)
            _report(wfd, _FAILED + f"{index} {exc}".encode("utf-8", "backslashreplace"))
            return 1

        def hand_over(item: QueueItem) -> bool:
            """An item that waits for a retry goes to the main process."""
            if _report(wfd, _HAND + item.id.encode()):
                return True
            # the main process is gone: the item waits for its next start
            log.error("reception worker %d: the main process is gone; stopping", index)
            server.request_stop()
            return False

        async def gate() -> bool:
            if not _report(wfd, _READY + str(index).encode()):
                return False
            if await _wait_go(go_fd):
                return True
            log.info("reception worker %d: start-up abandoned by the main process", index)
            return False

        server.hand_over = hand_over
        try:
            started = await server.serve(gate=gate)
        except Exception as exc:
            _report(wfd, _FAILED + f"{index} {exc}".encode("utf-8", "backslashreplace"))
            raise
        return 0 if started or server.stop_requested else 1

    log.info("reception worker %d started (pid %d)", index, os.getpid())
    try:
        return asyncio.run(run())
    finally:
        os.close(go_fd)


def attach_main(server: Server, workers: Workers) -> None:
    """In the main process: follow the workers' start-up reports, take the items they hand
    over, take over the items of a worker that dies, pass signals on to them."""
    if workers.rfd is None:
        return
    rfd = workers.rfd
    loop = asyncio.get_running_loop()
    buffer = bytearray()
    server.owned_elsewhere = workers.owned_by_a_worker

    def readable() -> None:
        try:
            chunk = os.read(rfd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            loop.remove_reader(rfd)
            return
        buffer.extend(chunk)
        *lines, rest = bytes(buffer).split(b"\n")
        buffer[:] = rest
        for line in lines:
            if line.startswith(_READY):
                workers.ready.add(int(line[len(_READY):] or 0))
            elif line.startswith(_FAILED):
                index, _, why = line[len(_FAILED):].partition(b" ")
                workers.failed[int(index or 0)] = why.decode("utf-8", "replace")
            elif line.startswith(_HAND) and server.runner is not None:
                server.state.spawn(server.runner.schedule_id(
                    line[len(_HAND):].decode("ascii", "replace"), wait=True))

    os.set_blocking(rfd, False)
    loop.add_reader(rfd, readable)
    watchers = _watch_exits(server, workers, loop)
    server.on_stop.append(lambda: workers.signal_all(signal.SIGTERM))
    server.on_reload.append(lambda: workers.signal_all(signal.SIGHUP))
    def forget() -> None:
        loop.remove_reader(rfd)
        for fd in watchers:
            loop.remove_reader(fd)
            os.close(fd)
        watchers.clear()

    server.on_shutdown.append(forget)


def _watch_exits(server: Server, workers: Workers, loop: asyncio.AbstractEventLoop
                 ) -> list[int]:
    """A pidfd per worker, readable when it ends (polling once a second without pidfds).
    The descriptors watched."""
    fds: list[int] = []

    def ended(pid: int, fd: int | None) -> None:
        if fd is not None:
            loop.remove_reader(fd)
            os.close(fd)
            fds.remove(fd)
        before = set(workers.exited)
        workers._check_exits()
        if pid not in workers.exited or pid in before or server.state.stopping:
            return
        prefix = workers.prefixes.get(pid, b"")
        log.error("reception worker (pid %d) ended (%s); the main process delivers its "
                  "items", pid, _describe(workers.exited[pid]))
        if server.runner is not None:
            server.state.spawn(server.runner.take_over(lambda qid: id_prefix(qid) == prefix))

    pidfd_open = getattr(os, "pidfd_open", None)
    for pid in workers.pids:
        try:
            if pidfd_open is None:
                raise OSError("no pidfd")
            fd = pidfd_open(pid)
        except OSError:
            def poll(pid: int = pid) -> None:
                ended(pid, None)
                if pid not in workers.exited and not server.state.stopping:
                    loop.call_later(1.0, poll)

            loop.call_later(1.0, poll)
            continue
        fds.append(fd)
        loop.add_reader(fd, ended, pid, fd)
    return fds


def main_gate(server: Server, workers: Workers) -> Callable[[], Awaitable[bool]] | None:
    """The main process's start-up gate: every worker ready, then the go-ahead to all."""
    if not workers.pids:
        return None

    async def gate() -> bool:
        if await workers.all_ready(startup_timeout(server.config)):
            workers.release()
            return True
        log.error("%s; tampu does not serve", workers.failure)
        workers.abandon()
        return False

    return gate
