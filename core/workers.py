"""Several reception processes on the same listeners (``[server] workers = N``).

The main process runs a full server (reception and the delivery runner); N-1 forked workers run
reception only. Every process binds its own listening sockets with SO_REUSEPORT, so the kernel
spreads connections over them. A worker tells the main process about each new queue item over
a pipe (the item is already durable when it does), and the main process schedules its delivery.
SIGTERM/SIGINT/SIGHUP given to the main process are passed on to the workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING

from tampu.config import Config
from tampu.item import QueueItem

if TYPE_CHECKING:
    from tampu.server import Server

log = logging.getLogger("tampu.workers")


def fork_workers(config: Config, count: int) -> tuple[list[int], int | None]:
    """Fork ``count`` reception workers. Returns (their PIDs, the read end of their pipe).

    Must be called before any event loop exists. In a worker this function does not return:
    the worker serves until stopped and exits.
    """
    if count <= 0:
        return [], None
    rfd, wfd = os.pipe()
    pids = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            os.close(rfd)
            code = 1
            try:
                code = _worker_main(config, wfd, index + 1)
            except BaseException:
                log.exception("worker %d failed", index + 1)
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(wfd)
    return pids, rfd


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


def _worker_main(config: Config, wfd: int, index: int) -> int:
    from tampu.server import Server

    async def run() -> None:
        server = Server(config, deliver=False)
        server.bind(reuse_port=True)

        def notify(item: QueueItem, _message: bytes) -> None:
            try:
                os.write(wfd, f"{item.id}\n".encode())
            except BrokenPipeError:  # the main process is gone: the item waits for its start
                log.error("worker %d: the main process is gone; stopping", index)
                server.request_stop()

        server.intake.schedulers.append(notify)
        await server.serve()

    log.info("reception worker %d started (pid %d)", index, os.getpid())
    asyncio.run(run())
    return 0


def attach_main(server: Server, pids: list[int], rfd: int | None) -> None:
    """In the main process: schedule items the workers queued; pass signals on to them."""
    if rfd is None:
        return
    loop = asyncio.get_running_loop()
    buffer = bytearray()

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
        if server.runner is not None:
            for qid in lines:
                server.state.spawn(server.runner.schedule_id(qid.decode()))

    os.set_blocking(rfd, False)
    loop.add_reader(rfd, readable)

    def forward(sig: signal.Signals) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    server.on_stop.append(lambda: forward(signal.SIGTERM))
    server.on_reload.append(lambda: forward(signal.SIGHUP))


def reap(pids: list[int], timeout: float = 30.0) -> None:
    """Wait for the workers to exit (after they got SIGTERM); kill those that do not."""
    import time

    end = time.monotonic() + timeout
    pending = set(pids)
    while pending and time.monotonic() < end:
        for pid in list(pending):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                pending.discard(pid)
        time.sleep(0.05)
    for pid in pending:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
