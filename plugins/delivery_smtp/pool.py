"""Outgoing SMTP connections: limits per destination and in all, and reuse of idle sessions.

A *destination* is one remote address and port (what the receiving server sees as one
client's connections). :class:`ConnectionPool` lets at most ``per_destination`` connections be
open to one destination and ``total`` to all, idle ones included; a delivery that finds no
room waits its turn (first come, first served) instead of opening one more. A delivery that
ends cleanly gives its connection back: it stays open, idle, for ``idle_timeout`` seconds, and
the next delivery to the same destination under the same conditions (``key``: host name, TLS
requirement, credentials, EHLO name) takes it instead of connecting again (with an RSET
first, to see that it still works). A connection serves at most ``max_messages``
transactions. When the limit in all is reached, idle connections to other destinations are
closed to make room.

When a new connection to a destination fails (refused, timed out, greeting refused), the
deliveries waiting for room at that destination at that moment are told at once
(:class:`DestinationFailed`) instead of each waiting its turn to fail the same way: they go on
to the next address or MX host, or are deferred.

The pool lives in the server stash, so that a reload (a new plugin instance) keeps the
connections and their count; :meth:`configure` applies new limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Final

import aiosmtplib

from tampu import DeliveryResult, StashKey
from tampu.plugins.domaininfo.store import SecLevel

log = logging.getLogger("tampu.plugins.delivery_smtp.pool")

Destination = tuple[str, int]
"""(address, port)."""
QUIT_TIMEOUT: Final = 2.0


@dataclass(eq=False)
class Session:
    """An open, ready SMTP connection (after EHLO, TLS and AUTH as its key says)."""

    smtp: aiosmtplib.SMTP
    level: SecLevel
    remote: str
    messages: int = 0
    """Transactions done on it."""
    opened: float = field(default_factory=time.monotonic)


class DestinationFailed(Exception):
    """A new connection to the destination failed while this delivery waited for room."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.text)
        self.result = result


@dataclass(eq=False)
class _Idle:
    key: Hashable
    session: Session
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Waiter:
    dest: Destination
    key: Hashable
    future: asyncio.Future[Session | None]


@dataclass
class _Dest:
    busy: int = 0
    idle: list[_Idle] = field(default_factory=list)
    """Most recently used last."""
    closing: int = 0
    """Connections saying QUIT: they count until they are closed."""

    @property
    def open(self) -> int:
        return self.busy + len(self.idle) + self.closing


@dataclass
class _Coming:
    """Connections being closed, during one pass over the waiters: the room each will make
    is promised to one waiter, so that no more idle connections are closed than needed."""

    total: int
    per_dest: dict[Destination, int]

    def take(self, dest: Destination | None) -> bool:
        """Promise one (one to ``dest``; None: any) to a waiter, if there is one left."""
        if dest is not None:
            if self.per_dest.get(dest, 0) <= 0:
                return False
            self.per_dest[dest] -= 1
        elif self.total <= 0:
            return False
        self.total -= 1
        return True


class ConnectionPool:
    def __init__(self, per_destination: int = 20, total: int = 100,
                 idle_timeout: float = 5.0, max_messages: int = 100) -> None:
        self.per_destination = per_destination
        self.total = total
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self._dests: dict[Destination, _Dest] = {}
        self._open = 0
        self._waiters: deque[_Waiter] = deque()
        self._closing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ state

    @property
    def open_connections(self) -> int:
        """Open connections, busy and idle."""
        return self._open

    def configure(self, *, per_destination: int, total: int, idle_timeout: float,
                  max_messages: int) -> None:
        """New limits (a reload); idle connections are closed, since the TLS settings they
        were opened with may have changed."""
        self.per_destination, self.total = per_destination, total
        self.idle_timeout, self.max_messages = idle_timeout, max_messages
        self.flush()

    # ------------------------------------------------------------------ leases

    async def lease(self, dest: Destination, key: Hashable) -> Session | None:
        """Room for one connection to ``dest``: an idle session opened under ``key`` (now
        busy), or None: the caller opens a new connection and must call :meth:`give_back`
        (or :meth:`failed` first) in all cases. Waits while the limits are reached; raises
        DestinationFailed when a connection to ``dest`` failed meanwhile."""
        waiter = _Waiter(dest, key, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._grant()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            fut = waiter.future
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.give_back(dest, key, fut.result(), reusable=True)
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            raise

    def give_back(self, dest: Destination, key: Hashable, session: Session | None, *,
                  reusable: bool) -> None:
        """End a lease: keep ``session`` idle if ``reusable`` (and it may serve more), else
        close it. None: no connection is open any more (it failed or was closed)."""
        d = self._dests[dest]
        d.busy -= 1
        if session is not None and reusable and session.smtp.is_connected \
                and session.messages < self.max_messages and self.idle_timeout > 0:
            idle = _Idle(key, session)
            idle.timer = asyncio.get_running_loop().call_later(self.idle_timeout,
                                                                self._expire, dest, idle)
            d.idle.append(idle)
        elif session is not None:
            self._close(dest, d, session)
        else:
            self._closed(dest, d)
        self._grant()

    def failed(self, dest: Destination, result: DeliveryResult) -> None:
        """A new connection to ``dest`` failed: the deliveries waiting for room there learn
        it now (DestinationFailed with ``result``)."""
        for waiter in [w for w in self._waiters if w.dest == dest]:
            self._waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(DestinationFailed(result))

    def _grant(self) -> None:
        """Serve waiters in order, each as soon as the limits allow."""
        coming = _Coming(sum(d.closing for d in self._dests.values()),
                         {dest: d.closing for dest, d in self._dests.items() if d.closing})
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            d = self._dests.get(waiter.dest)
            if d is not None:
                idle = next((i for i in reversed(d.idle) if i.key == waiter.key), None)
                if idle is not None:
                    self._take_idle(d, idle)
                    d.busy += 1
                    self._waiters.remove(waiter)
                    waiter.future.set_result(idle.session)
                    continue
            if not self._make_room(waiter.dest, coming):
                continue
            d = self._dests.setdefault(waiter.dest, _Dest())
            d.busy += 1
            self._open += 1
            self._waiters.remove(waiter)
            waiter.future.set_result(None)

    def _make_room(self, dest: Destination, coming: _Coming) -> bool:
        """Whether one more connection to ``dest`` may open now. When the limits are reached,
        a connection being closed will make room (one per waiter), else an idle one in the
        way is closed: under another key at ``dest``, or the oldest anywhere for the limit in
        all."""
        d = self._dests.get(dest)
        if d is not None and d.open >= self.per_destination:
            if coming.take(dest):
                return False
            if d.idle:
                self._evict(dest, d, d.idle[0])  # an idle one under another key
            if self._dests.get(dest) is not d or d.open >= self.per_destination:
                return False  # room once it is closed
        if self._open < self.total:
            return True
        if coming.take(None):
            return False
        idle = [(od.idle[0].session.opened, other, od) for other, od in self._dests.items()
                if od.idle]
        if idle:
            _, other, od = min(idle, key=lambda entry: entry[0])
            self._evict(other, od, od.idle[0])
        return self._open < self.total

    def _take_idle(self, d: _Dest, idle: _Idle) -> None:
        d.idle.remove(idle)
        if idle.timer is not None:
            idle.timer.cancel()

    def _evict(self, dest: Destination, d: _Dest, idle: _Idle) -> None:
        self._take_idle(d, idle)
        self._close(dest, d, idle.session)

    def _closed(self, dest: Destination, d: _Dest) -> None:
        """One connection to ``dest`` is closed: its room is free."""
        self._open -= 1
        if d.open == 0 and self._dests.get(dest) is d:
            del self._dests[dest]

    def _expire(self, dest: Destination, idle: _Idle) -> None:
        d = self._dests.get(dest)
        if d is not None and idle in d.idle:
            self._evict(dest, d, idle)
            self._grant()

    # ------------------------------------------------------------------ closing

    def _close(self, dest: Destination, d: _Dest, session: Session) -> None:
        """QUIT politely in the background (bounded), then close; the connection keeps its
        room until then, so that the remote never sees more than the limits."""
        if not session.smtp.is_connected:
            session.smtp.close()
            self._closed(dest, d)
            return
        d.closing += 1

        def done(task: asyncio.Task[None]) -> None:
            self._closing.discard(task)
            d.closing -= 1
            self._closed(dest, d)
            self._grant()

        task = asyncio.get_running_loop().create_task(_quit(session.smtp))
        self._closing.add(task)
        task.add_done_callback(done)

    def flush(self) -> None:
        """Close every idle connection (reload, shutdown)."""
        for dest, d in list(self._dests.items()):
            for idle in list(d.idle):
                self._evict(dest, d, idle)
        if self._waiters:
            with contextlib.suppress(RuntimeError):  # no loop: nothing can be waiting
                self._grant()

    async def close(self) -> None:
        """At shutdown: close the idle connections and wait (bounded) for their QUIT."""
        self.flush()
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=QUIT_TIMEOUT + 1)


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(smtp.quit(), QUIT_TIMEOUT)
    smtp.close()


POOL: StashKey[ConnectionPool] = StashKey()
"""The server's pool, kept across reloads."""
