"""The queue log's syncs in a helper process (tampu.log_sync): real files, a real helper."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tampu.log_sync import GroupSync
from tampu.store import Durable


def _helper_pid(group: GroupSync) -> int:
    assert group._proc is not None
    return group._proc.pid


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    """A segment-like file, open for writing."""
    fd = os.open(tmp_path / "seg", os.O_WRONLY | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


@pytest.fixture
def pipe_end() -> Iterator[int]:
    """The write end of a pipe: fdatasync of it fails with EINVAL."""
    read_end, write_end = os.pipe()
    yield write_end
    os.close(read_end)
    os.close(write_end)


@pytest.fixture
def group() -> Iterator[GroupSync]:
    group = GroupSync()
    yield group
    group.close()


def test_batches_written_during_a_sync_share_the_next_one(fd: int, group: GroupSync) -> None:
    async def main() -> None:
        os.write(fd, b"first")
        first = group.written(fd)
        await group.wait(first)  # starts the helper; one request
        assert group.syncs == 1
        os.write(fd, b"second")
        second = group.written(fd)  # on the loop: sent at once
        assert group._in_flight == second
        later = []
        for _ in range(5):
            os.write(fd, b"more")
            later.append(group.written(fd))  # one in flight: these wait for the next
        await asyncio.gather(group.wait(second), *(group.wait(s) for s in later))
        assert group.syncs == 7  # one descriptor per batch ...
        assert group._synced == later[-1]
        await group.wait(first)  # already durable: returns at once

    asyncio.run(main())
    pid = _helper_pid(group)
    group.close()
    assert _gone(pid)


def test_requests_to_the_helper_cover_every_waiting_batch(fd: int, group: GroupSync) -> None:
    """Two requests for six batches: the first batch's, then one for the five written
    while it was in flight."""
    sent: list[int] = []

    async def main() -> None:
        await group.wait(group.written(fd))  # the helper runs
        real_send = group._send

        def counting_send() -> None:
            before = len(group._unsynced)
            real_send()
            sent.append(before - len(group._unsynced))

        group._send = counting_send  # type: ignore[method-assign]
        seqs = [group.written(fd) for _ in range(6)]
        await asyncio.gather(*(group.wait(s) for s in seqs))

    asyncio.run(main())
    assert sent == [1, 5]


def test_a_failed_sync_fails_its_waiters_and_not_the_next(fd: int, pipe_end: int,
                                                          group: GroupSync) -> None:
    """fdatasync of a pipe fails (EINVAL) in the helper: the batch's wait raises that
    error; a later batch on a real file is synced by the same helper."""
    async def main() -> None:
        bad = group.written(pipe_end)
        with pytest.raises(OSError) as info:
            await group.wait(bad)
        assert info.value.errno == errno.EINVAL
        assert group._synced < bad
        good = group.written(fd)
        await group.wait(good)
        assert group._synced == good

    asyncio.run(main())


def test_a_dead_helper_is_replaced_by_syncs_on_the_loop(fd: int, group: GroupSync,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    async def main() -> None:
        await group.wait(group.written(fd))
        pid = _helper_pid(group)
        os.kill(pid, signal.SIGKILL)  # not SIGTERM: the helper ignores that
        in_flight = group.written(fd)  # sent (or not) to a helper that is dying
        await asyncio.wait_for(group.wait(in_flight), 10)
        assert group._synced >= in_flight and group._sent == []
        assert await asyncio.to_thread(_gone, pid)
        seqs = [group.written(fd) for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(*(group.wait(s) for s in seqs)), 10)
        assert group._synced == seqs[-1]
        assert group._broken and group._sock is None
        after = group.written(fd)
        await group.wait(after)  # synced here, at once
        assert group._synced == after

    with caplog.at_level(logging.WARNING, logger="tampu.queue"):
        asyncio.run(main())
    assert any("the event loop syncs the log itself" in r.getMessage()
               for r in caplog.records)


def test_the_helper_ignores_sigterm_and_ends_with_its_socket(fd: int, group: GroupSync
                                                             ) -> None:
    """A service manager's SIGTERM to the whole group must not fail the syncs of a server
    that is shutting down; the helper ends when the server closes its socket (or exits)."""
    async def main() -> int:
        await group.wait(group.written(fd))
        pid = _helper_pid(group)
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(0.2)
        os.kill(pid, 0)  # still there
        await group.wait(group.written(fd))
        return pid

    pid = asyncio.run(main())
    group.close()
    assert _gone(pid)


def test_a_new_event_loop_gets_a_helper_of_its_own(fd: int, group: GroupSync) -> None:
    async def one() -> int:
        await group.wait(group.written(fd))
        return _helper_pid(group)

    first = asyncio.run(one())
    second = asyncio.run(one())
    assert first != second
    assert _gone(first)  # the first loop's helper was ended, not left behind


def test_callbacks_run_at_the_sync_before_wait_returns_and_never_on_failure(
        fd: int, pipe_end: int, group: GroupSync) -> None:
    """The SMTP session's 250 goes from these callbacks (tampu.store.ON_DURABLE)."""
    calls: list[str] = []

    def notice(name: str) -> Durable:
        return Durable(name, lambda sent: calls.append(f"{name}{sent}"))

    async def main() -> None:
        await group.wait(group.written(fd))  # the helper runs
        seq = group.written(fd, [notice("a"), notice("b")])
        waiting = asyncio.ensure_future(group.wait(seq))
        while not calls:
            assert not waiting.done()  # the callbacks come first
            await asyncio.sleep(0)
        assert calls == ["a0", "b0"]  # no socket given: the session sends its reply
        await waiting
        bad = group.written(pipe_end, [notice("bad")])
        with pytest.raises(OSError):
            await group.wait(bad)
        assert calls == ["a0", "b0"] and group._then == {}

    asyncio.run(main())


def test_the_helper_writes_the_replies_after_the_sync_and_none_when_it_fails(
        fd: int, pipe_end: int, group: GroupSync) -> None:
    """The 250 goes from the helper the moment the sync returns; the loop sends what the
    helper could not write (a full socket), and nothing is written when the sync failed."""
    calls: list[tuple[str, int]] = []
    pairs = [socket.socketpair() for _ in range(3)]
    for ours, _client in pairs:
        ours.setblocking(False)
    full = pairs[2][0]
    while True:  # the third client reads nothing: its socket takes no more bytes
        try:
            full.send(b"x" * 65536)
        except BlockingIOError:
            break

    def notice(name: str, sock: socket.socket) -> Durable:
        return Durable(name, lambda sent: calls.append((name, sent)),
                       f"250 2.0.0 Queued as {name}\r\n".encode(), sock.fileno)

    async def main() -> None:
        await group.wait(group.written(fd))  # the helper runs
        notices = [notice(f"id{i}", ours) for i, (ours, _c) in enumerate(pairs)]
        seq = group.written(fd, notices)
        await group.wait(seq)
        assert calls == [("id0", 25), ("id1", 25), ("id2", 0)]
        assert pairs[0][1].recv(100) == b"250 2.0.0 Queued as id0\r\n"
        assert pairs[1][1].recv(100) == b"250 2.0.0 Queued as id1\r\n"
        calls.clear()
        ours, client = pairs[0]
        failing = notice("bad", ours)
        bad = group.written(pipe_end, [failing])
        with pytest.raises(OSError):
            await group.wait(bad)
        assert calls == []
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(100)  # no 250 for a batch whose sync failed

    try:
        asyncio.run(main())
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_a_helper_dead_before_its_answer_leaves_its_replies_unknown(
        fd: int, group: GroupSync) -> None:
    """Stopped with a request (and a reply to write) in hand, then killed: whether it wrote
    the 250 is unknown, so the session hears -1 (it closes the connection); the batch is
    synced on the loop and is durable."""
    calls: list[int] = []
    ours, client = socket.socketpair()

    async def main() -> None:
        await group.wait(group.written(fd))
        pid = _helper_pid(group)
        os.kill(pid, signal.SIGSTOP)
        notice = Durable("id", calls.append, b"250 2.0.0 Queued as id\r\n", ours.fileno)
        seq = group.written(fd, [notice])
        assert group._early == [notice]  # in the request the stopped helper holds
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(group.wait(seq), 10)
        assert calls == [-1] and group._synced >= seq

    try:
        asyncio.run(main())
    finally:
        ours.close()
        client.close()
