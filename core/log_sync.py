"""The queue log's ``fdatasync`` off the event loop, in a helper process.

The group commit writes a batch's records on the event loop (a write into the page cache),
but the ``fdatasync`` that makes them durable takes a millisecond or more. Done on the loop,
it stops every session of the process for that long; done in a thread, the thread needs
the GIL back when the call returns, and a busy loop gives it up only every switch interval
(5 ms), which is what the ``250`` would wait. So one small helper process per serving
process does the syncs: the loop sends it duplicates of the segments' descriptors over a
socket pair (``SCM_RIGHTS``) and hears back on the same socket, as any other I/O event.

The same request carries the ``250`` of each SMTP session that waits for those batches and
has nothing else to send (:class:`tampu.store.Durable`: its bytes and a duplicate of the
client's socket). The helper writes them the moment every sync of the request returned,
and none when one failed; the loop, busy with other sessions, hears of it a turn later,
and sends whatever the helper could not (a full socket buffer). A helper that dies in
between leaves it unknown whether a ``250`` went: those sessions are closed (the client
sends again; a message twice is allowed, a lost one is not).

:class:`GroupSync` keeps one sync in flight at a time; batches written meanwhile wait for
the next one, which covers all of them (the second half of the group commit). Each batch is
known by a sequence number (:meth:`GroupSync.written`); :meth:`GroupSync.wait` returns once
a sync that began after that batch's write has returned, or raises its ``OSError``. When
the helper cannot run (no ``SCM_RIGHTS``, a failed start, a helper that died) the loop
syncs by itself, as it did before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import weakref
from typing import Any, Final

from tampu.store import Durable

log = logging.getLogger("tampu.queue")

_REQUEST: Final = struct.Struct("<HH")
"""After b"S": how many descriptors to sync, how many replies follow (their lengths as
"<H" each, then their bytes; their sockets' descriptors after those to sync)."""
_REPLY: Final = struct.Struct("<iH")
"""The errno of the first failed sync (0: all durable), how many reply counts follow ("<i"
each: bytes the helper wrote of each reply)."""
MAX_FDS: Final = 64
"""Descriptors in one request (more segments than this wait for the next sync; more
replies are sent by the loop)."""
MAX_REPLY: Final = 1024
"""Longest reply the helper writes (MAX_FDS of them fit in one request)."""
MAX_REQUEST: Final = 65536
HELPER: Final = f"""# tampu queue log sync helper (tampu.log_sync)
import os, signal, socket, struct, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    try:
        msg, fds, _flags, _addr = socket.recv_fds(s, {MAX_REQUEST}, {MAX_FDS})
    except (OSError, ValueError):
        break
    if not msg:
        break
    nsync, nreply = struct.unpack_from("<HH", msg, 1)
    lengths = struct.unpack_from(f"<{{nreply}}H", msg, 5)
    at = 5 + 2 * nreply
    whole = len(fds) == nsync + nreply
    err = 0
    for fd in fds[:nsync]:
        if not err:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                err = exc.errno or 5
        os.close(fd)
    sent = []
    for fd, n in zip(fds[nsync:], lengths):
        k = 0
        if not err and whole:
            try:
                k = os.write(fd, msg[at:at + n])
            except OSError:
                k = 0
        at += n
        sent.append(k)
    for fd in fds[nsync:]:
        os.close(fd)
    s.send(struct.pack(f"<iH{{len(sent)}}i", err, len(sent), *sent))
"""
"""The helper's whole program (``python -I -S -c``: no site, a few MiB). It ignores SIGINT
and SIGTERM (a terminal's or a service manager's signal to the group must not fail the syncs
of a server that is shutting down) and ends when its socket closes: when the server exits.
The client sockets it writes to are non-blocking: a full one takes part of a reply, or none."""


class GroupSync:
    """The syncs of one queue log in one process (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        """Guards ``_unsynced`` and ``_seq`` (batches may be written in the I/O thread)."""
        self._seq = 0
        self._unsynced: list[tuple[int, int]] = []
        """(sequence number, duplicate descriptor) of batches written and not yet sent."""
        self._synced = 0
        self._in_flight = 0
        """The highest sequence number the sync being done covers (0: none is)."""
        self._sent: list[tuple[int, int]] = []
        """The batches of the request in flight (their descriptors stay open until the
        reply: when the helper dies first, they are synced here)."""
        self._early: list[Durable] = []
        """The replies the request in flight asks the helper to write."""
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._then: dict[int, list[Durable]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = -1
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._broken = not hasattr(socket, "send_fds")
        self.syncs = 0

    # ------------------------------------------------------------ the writing side

    def written(self, fd: int, then: list[Durable] | None = None) -> int:
        """A batch was written to ``fd`` (any thread): its sequence number for :meth:`wait`.
        ``then``: called on the event loop the moment the batch is durable (from the
        helper's reply: a turn of the loop before :meth:`wait` returns), each with its
        :attr:`~tampu.store.Durable.sent`; never when its sync fails."""
        dup = os.dup(fd)
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._unsynced.append((seq, dup))
            if then:
                self._then[seq] = then
        if not self._in_flight and self._sock is not None and self._on_loop():
            self._send()  # on the loop: the sync starts now, not when a put waits for it
        return seq

    async def wait(self, seq: int) -> None:
        """Return when batch ``seq`` is durable (on the event loop). Raises OSError."""
        if seq <= self._synced:
            return
        loop = asyncio.get_running_loop()
        if not self._ready(loop):
            self._sync_here(seq)
            return
        future = self._waiters.get(seq)
        if future is None:
            future = self._waiters[seq] = loop.create_future()
        if not self._in_flight:
            self._send()
        await future

    async def drain(self) -> None:
        """Return when no batch waits for a sync (before :meth:`close`)."""
        while self._waiters:
            await asyncio.gather(*self._waiters.values(), return_exceptions=True)

    # ------------------------------------------------------------ the helper

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop and self._pid == os.getpid()
        except RuntimeError:
            return False

    def _ready(self, loop: asyncio.AbstractEventLoop) -> bool:
        if self._broken:
            return False
        if self._sock is not None and self._pid == os.getpid() and self._loop is loop:
            return True
        self._drop()  # forked, or a new loop (tests): a helper of our own
        self._waiters, self._then = {}, {}  # the old loop's
        if self._sent:  # the old helper's unanswered request
            try:
                self._sync_here(0)
            except OSError:
                pass
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            return self._give_up(f"no socket pair ({exc.strerror or exc})")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", HELPER, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            ours.close()
            return self._give_up(f"cannot start the sync helper ({exc.strerror or exc})")
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock, self._loop, self._pid = ours, loop, os.getpid()
        loop.add_reader(ours.fileno(), self._replied)
        self._finalizer = weakref.finalize(self, _end, ours, self._proc)
        return True

    def _give_up(self, why: str) -> bool:
        log.warning("queue log: %s; the event loop syncs the log itself", why)
        self._broken = True
        return False

    def _send(self) -> None:
        with self._lock:
            batch, self._unsynced = self._unsynced[:MAX_FDS], self._unsynced[MAX_FDS:]
            waiting = [d for seq, _fd in batch for d in self._then.get(seq, ())]
        if not batch:
            return
        early: list[Durable] = []
        sockets: list[int] = []
        for d in waiting:  # on the loop: each descriptor stays valid until send_fds
            fd = d.socket() if d.socket is not None and len(d.reply) <= MAX_REPLY else -1
            if fd >= 0 and len(batch) + len(early) < MAX_FDS:
                early.append(d)
                sockets.append(fd)
        request = [b"S", _REQUEST.pack(len(batch), len(early)),
                   struct.pack(f"<{len(early)}H", *(len(d.reply) for d in early)),
                   *(d.reply for d in early)]
        self._sent = batch  # kept open until the reply: a helper may die before it
        try:
            assert self._sock is not None
            socket.send_fds(self._sock, [b"".join(request)],
                            [fd for _seq, fd in batch] + sockets)
        except OSError as exc:
            self._helper_failed(f"the sync helper is gone ({exc.strerror or exc})")
            return
        self._early = early
        self.syncs += len(batch)
        self._in_flight = batch[-1][0]

    def _replied(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(_REPLY.size + 4 * MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if len(data) < _REPLY.size:
            self._helper_failed("the sync helper ended")
            return
        err, count = _REPLY.unpack_from(data)
        early, self._early = self._early, []
        if count == len(early) and len(data) == _REPLY.size + 4 * count:
            for durable, sent in zip(early, struct.unpack_from(f"<{count}i", data,
                                                               _REPLY.size), strict=True):
                durable.sent = sent
        done, self._in_flight = self._in_flight, 0
        sent, self._sent = self._sent, []
        for _seq, fd in sent:
            os.close(fd)
        error = OSError(err, os.strerror(err)) if err else None
        self._settle(done, error)
        if any(seq > self._synced for seq in self._waiters):
            self._send()

    def _settle(self, upto: int, error: OSError | None) -> None:
        if error is None:
            self._synced = max(self._synced, upto)
            self._call_then(upto)
        else:
            with self._lock:
                for seq in [s for s in self._then if s <= upto]:
                    del self._then[seq]
        for seq in [s for s in self._waiters if s <= upto]:
            future = self._waiters.pop(seq)
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def _helper_failed(self, why: str) -> None:
        """The helper is gone: sync here what it had and what waits (then give up on it).
        Whether it wrote the replies it was given is unknown (``sent`` -1)."""
        for durable in self._early:
            durable.sent = -1
        self._early = []
        self._drop()
        self._give_up(why)
        upto = max(self._waiters, default=0)
        try:
            self._sync_here(upto)
        except OSError as exc:
            self._settle(upto, exc)
            return
        self._settle(upto, None)

    def _sync_here(self, seq: int) -> None:
        """Sync on this thread every batch written so far (at least up to ``seq``), those
        sent to a helper that did not answer included."""
        with self._lock:
            batch, self._unsynced = self._unsynced, []
        batch, self._sent = self._sent + batch, []
        error: OSError | None = None
        for _seq, fd in batch:
            try:
                if error is None:
                    os.fdatasync(fd)
                    self.syncs += 1
            except OSError as exc:
                error = exc
            finally:
                os.close(fd)
        if error is not None:
            raise error
        self._synced = max(self._synced, seq, *(s for s, _fd in batch))
        self._call_then(self._synced)

    def _call_then(self, upto: int) -> None:
        with self._lock:
            thens = [self._then.pop(seq) for seq in [s for s in self._then if s <= upto]]
        for callbacks in thens:
            for callback in callbacks:
                try:
                    callback.send(callback.sent)
                except Exception:
                    log.exception("queue log: a callback after the sync failed")

    def _drop(self) -> None:
        sock, proc = self._sock, self._proc
        self._sock = self._proc = None
        self._in_flight = 0
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if sock is None:
            return
        if self._pid != os.getpid():  # a forked copy: the helper is the parent's
            sock.close()
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        _end(sock, proc)

    def close(self) -> None:
        """End the helper (it exits when its socket closes); later batches sync here."""
        self._drop()
        self._broken = True


def _end(sock: socket.socket, proc: subprocess.Popen[bytes] | None) -> None:
    """Close the helper's socket (it exits then) and reap it."""
    sock.close()
    if proc is not None:
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
