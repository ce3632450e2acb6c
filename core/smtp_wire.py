"""The bytes of one SMTP connection: bounded input, command lines, DATA, deadlines, TLS.

Nothing here knows SMTP commands (that is :mod:`tampu.smtp`); this layer guarantees that no
client can make the server hold more than a bounded amount of memory or a connection slot
for longer than the deadlines:

* input is buffered up to :data:`HIGH_WATER` (then reading pauses); a command line longer
  than the limit is discarded as it arrives and answered as too long;
* DATA is read chunk by chunk: dot-unstuffed, counted, and no longer kept once it passes
  the size limit (the transfer is read to its end and refused);
* a command line must arrive within ``command_timeout`` of the previous reply, the whole
  connection within ``session_timeout`` (DATA transfers aside), a DATA transfer within its
  own deadline and above ``min_data_rate``; a TLS handshake within ``tls_handshake_timeout``.
  A deadline that passes ends the connection with ``421``;
* message bodies held by all sessions of a process together stay within a
  :class:`~tampu.smtp_memory.MemoryBudget` (past it a transfer is read to its end and refused
  with ``452``), and memory freed after large transfers goes back to the system
  (:func:`tampu.smtp_memory.give_memory_back`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Final, cast

from tampu.smtp_memory import MemoryBudget

HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
MAX_WRITE_BUFFER: Final = 1024 * 1024
"""A client that does not read its replies is dropped past this much unsent output."""
RATE_WINDOW: Final = 60.0
"""Seconds over which a DATA transfer's rate is measured against ``min_data_rate`` (or the
DATA timeout, when shorter)."""

_END = b"\r\n.\r\n"
TLS_RECORD_HANDSHAKE: Final = 0x16
SSLV2_HELLO: Final = 0x80

log = logging.getLogger("tampu.smtp")


class Closed(Exception):
    """The connection is gone (the client left, or a deadline ended it)."""


class LineTooLong(Exception):
    """A command line went past the limit; it was discarded up to its end."""


class ForeignProtocol(Exception):
    """A line starts like another protocol's first bytes (see ``Wire.readline``)."""


class NotTls(Exception):
    """The client sent something else than a TLS handshake after ``220`` to STARTTLS."""


@dataclass(slots=True)
class DataResult:
    """One DATA transfer as read: the message (None when refused), and why it was refused.
    ``held``: bytes of ``message`` taken from the memory budget (given back by the caller)."""

    message: bytes | None
    size: int
    too_big: bool = False
    line_too_long: bool = False
    no_memory: bool = False
    held: int = 0

    def take(self) -> bytes:
        """The message, handed over: this result keeps no reference to it."""
        message, self.message = self.message, None
        assert message is not None
        return message


class Wire(asyncio.Protocol):
    """Buffered input and output of one connection, read by one task (the session)."""

    def __init__(self, line_limit: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.line_limit = line_limit
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._paused = False
        self._deadline = float("inf")
        self._timer: asyncio.TimerHandle | None = None
        self.expired = ""
        """Why a deadline ended the connection ("" while none did)."""
        self.timeout_reply = b"421 4.4.2 Timeout, closing connection\r\n"
        self.received = 0
        self._peeking: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self.received += len(data)
        if len(self._buf) > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()
        self._stop_peeking()
        if self._timer is not None:
            self._timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _stop_peeking(self) -> None:
        """The connection is being closed: a wait for the first TLS byte ends now (the
        duplicate descriptor would otherwise keep the socket open until the deadline)."""
        peeking = self._peeking
        if peeking is not None and not peeking.done():
            peeking.set_exception(ConnectionResetError("connection closed"))

    # ---------------------------------------------------------------- deadlines

    def set_deadline(self, when: float) -> None:
        """The moment (loop time) waiting for input ends the connection; inf for none."""
        self._deadline = when
        if when != float("inf") and (self._timer is None or self._timer.when() > when):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self.loop.time() >= self._deadline:
            self.expire("timeout")
        elif self._deadline != float("inf"):
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def expire(self, why: str) -> None:
        """A deadline passed: say so and end the connection now."""
        if self.expired:
            return
        self.expired = why
        self._out.clear()
        self.write(self.timeout_reply)
        self.flush()
        self.abort()

    # ---------------------------------------------------------------- output

    def write(self, data: bytes) -> None:
        """Queue a reply; it is sent when the session next waits for input (pipelining)."""
        self._out.append(data)

    def flush(self) -> None:
        transport = self.transport
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.abort()  # the client does not read its replies

    def close(self) -> None:
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            if self._out and not self.transport.is_closing():
                self.transport.write(b"".join(self._out))
            self._out.clear()
            self.transport.close()  # sends what is buffered, then closes
            self.loop.call_later(2.0, self.transport.abort)
        self._eof = True
        self._wake()
        self._stop_peeking()

    @property
    def closed(self) -> bool:
        return self._eof and not self._buf

    # ---------------------------------------------------------------- input

    def _resume(self) -> None:
        if self._paused and len(self._buf) < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    async def _more(self) -> None:
        """Wait for input (the replies so far are sent first)."""
        if self._eof:
            raise Closed(self.expired or "closed")
        self.flush()
        self._resume()
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def discard_input(self) -> int:
        n = len(self._buf)
        self._buf.clear()
        self._resume()
        return n

    async def read_exactly(self, n: int, deadline: float) -> bytes:
        """``n`` bytes (for the PROXY header). Raises Closed."""
        self.set_deadline(deadline)
        while len(self._buf) < n:
            await self._more()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self.set_deadline(float("inf"))
        return data

    async def read_until(self, separator: bytes, deadline: float, limit: int = 4096) -> bytes:
        """Bytes up to and including ``separator`` (for the PROXY header). Raises Closed."""
        self.set_deadline(deadline)
        while (end := self._buf.find(separator)) < 0:
            if len(self._buf) > limit:
                raise Closed("PROXY header too long")
            await self._more()
        data = bytes(self._buf[:end + len(separator)])
        del self._buf[:end + len(separator)]
        self.set_deadline(float("inf"))
        return data

    async def readline(self, deadline: float, foreign: tuple[bytes, ...] = ()) -> bytes:
        """One line without its line ending. Raises Closed, LineTooLong, ForeignProtocol
        (the line starts with one of ``foreign``: known as soon as its first bytes are in,
        without waiting for a line end that may never come)."""
        armed = False
        discarding = False
        while True:
            if foreign and not discarding and self._buf.startswith(foreign):
                raise ForeignProtocol()
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                self.set_deadline(float("inf"))
                if discarding or end + 1 > self.line_limit:
                    raise LineTooLong()
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buf) > self.line_limit:
                discarding = True
                del self._buf[:-1]  # keep a trailing CR; the rest of the line is dropped
            if not armed:
                self.set_deadline(deadline)
                armed = True
            await self._more()

    async def read_data(self, max_size: int, deadline: float, min_rate: int,
                        budget: MemoryBudget | None = None, memory_limit: int = 0,
                        rate_window: float = RATE_WINDOW) -> DataResult:
        """Read a DATA transfer up to ``CRLF . CRLF``: dot-unstuffed (RFC 5321 4.5.2),
        kept while within ``max_size`` (and ``budget``), lines checked against the limit. Only
        a CRLF-dot-CRLF ends it (a bare LF never does: no SMTP smuggling). Nothing grows
        with the input beyond ``max_size``: a refused transfer is counted, not kept.
        Raises Closed (also when the rate stays under ``min_rate`` bytes per second over a
        window of ``rate_window`` seconds, at most :data:`RATE_WINDOW`)."""
        self._buf[0:0] = b"\r\n"  # a virtual line start: the terminator may be the first line
        out = io.BytesIO()  # getvalue() hands its buffer over: no copy at the end
        held, size, first = 0, -2, True
        too_big = too_long = no_memory = False
        limit = self.line_limit
        long_line = _long_line(limit)
        self.set_deadline(deadline)
        window = min(RATE_WINDOW, rate_window)
        window_end, window_bytes = self.loop.time() + window, self.received
        tick: asyncio.TimerHandle | None = None
        try:
            while True:
                buf = self._buf
                end = buf.find(_END)
                done = end >= 0
                cut = end + 2 if done else buf.rfind(b"\r\n", 0, max(0, len(buf) - 4))
                if not done and cut <= 0 and len(buf) > self.line_limit + 6:
                    # one long line and no CRLF yet: drop it as it comes, keep what could
                    # start the terminator, after a byte that is no line start
                    too_long = True
                    size += len(buf) - 6
                    buf[:] = b"\r\nX" + buf[-4:]
                    continue
                if cut > 0:
                    with memoryview(buf) as view:
                        chunk = view[:cut].tobytes().replace(b"\r\n.", b"\r\n")
                    del buf[:cut]
                    size += len(chunk)
                    if not too_long and _has_long_line(chunk, limit, long_line):
                        too_long = True
                    if size > max_size:
                        too_big = True
                    keep = not (too_big or too_long or no_memory)
                    if keep and budget is not None:
                        if budget.take(len(chunk), memory_limit):
                            held += len(chunk)
                        else:
                            no_memory, keep = True, False
                    if keep:
                        with memoryview(chunk) as view:
                            out.write(view[2:] if first else view)
                    elif held or out.tell():  # refused: what was kept goes at once
                        out = io.BytesIO()
                        if budget is not None:
                            budget.give(held)
                        held = 0
                    first = False
                if done:
                    del buf[:3]  # ".\r\n"; what follows is the next command
                    self.set_deadline(float("inf"))
                    keep = not (too_big or too_long or no_memory)
                    result = DataResult(out.getvalue() if keep else None, max(0, size),
                                        too_big, too_long, no_memory and not too_big,
                                        held if keep else 0)
                    held = 0
                    return result
                if min_rate:
                    now = self.loop.time()
                    if now >= window_end:
                        if self.received - window_bytes < min_rate * window:
                            raise Closed("too slow")
                        window_end, window_bytes = now + window, self.received
                    if tick is None or tick.when() != window_end:
                        if tick is not None:
                            tick.cancel()
                        tick = self.loop.call_at(window_end, self._wake)
                await self._more()
        finally:
            if tick is not None:
                tick.cancel()
            if held and budget is not None:  # the connection ended in the transfer
                budget.give(held)

    # ---------------------------------------------------------------- TLS

    async def start_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> None:
        """Upgrade the connection (STARTTLS). Raises OSError, ssl.SSLError or TimeoutError
        when the handshake fails or takes longer than ``handshake_timeout`` in all (the
        connection is then gone), NotTls when the client sends something else than a TLS
        handshake (the connection is still there, in plain text, the line unread)."""
        assert self.transport is not None
        deadline = self.loop.time() + handshake_timeout
        self.flush()
        old = self.transport
        # Nothing more reaches this protocol until the handshake: the first bytes stay in the
        # socket, to be peeked at here and read by the TLS layer.
        old.pause_reading()
        try:
            first = await self._peek_first_byte(deadline)
        except BaseException:
            old.abort()
            self._eof = True
            raise
        if first not in (TLS_RECORD_HANDSHAKE, SSLV2_HELLO):
            old.resume_reading()
            raise NotTls()
        try:
            new = await self.loop.start_tls(
                old, self, context, server_side=True,
                ssl_handshake_timeout=max(0.1, deadline - self.loop.time()))
        except BaseException:
            old.abort()
            self._eof = True
            raise
        if new is None:
            raise ConnectionResetError("TLS handshake failed")
        self.transport = new

    async def _peek_first_byte(self, deadline: float) -> int:
        """The first byte waiting in the socket, without reading it (the transport is
        paused). Raises TimeoutError at the deadline, ConnectionResetError at EOF."""
        assert self.transport is not None
        raw = self.transport.get_extra_info("socket")
        if raw is None:
            raise ConnectionResetError("connection closed")
        # A duplicate of the descriptor: the event loop refuses to watch the transport's own.
        peeker = socket.socket(fileno=os.dup(raw.fileno()))
        try:
            ready = self._peeking = self.loop.create_future()

            def readable() -> None:
                if not ready.done():
                    ready.set_result(None)

            self.loop.add_reader(peeker.fileno(), readable)
            try:
                async with asyncio.timeout_at(deadline):
                    while True:
                        await ready
                        try:
                            data = peeker.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                        except (BlockingIOError, InterruptedError):
                            ready = self._peeking = self.loop.create_future()
                            continue
                        if not data:
                            raise ConnectionResetError("closed before the TLS handshake")
                        return data[0]
            finally:
                self.loop.remove_reader(peeker.fileno())
        finally:
            self._peeking = None
            peeker.close()


_LONG_LINES: dict[int, re.Pattern[bytes]] = {}


def _long_line(limit: int) -> re.Pattern[bytes]:
    """A line after its CRLF with more than ``limit - 2`` bytes and no CR: anchored on the
    CRLF, so the search runs at memchr speed instead of trying every position."""
    pattern = _LONG_LINES.get(limit)
    if pattern is None:
        pattern = _LONG_LINES[limit] = re.compile(rb"\r\n[^\r]{%d}" % (limit - 1))
    return pattern


def _has_long_line(chunk: bytes, limit: int, pattern: re.Pattern[bytes]) -> bool:
    """Whether ``chunk`` (a CRLF, then whole lines, each up to a CRLF) has a line longer
    than ``limit`` bytes with its CRLF (RFC 5321 4.5.3.1.6). Lines end at CRLF only: a bare
    LF or CR is a character of the line."""
    if len(chunk) <= limit:
        return False
    if chunk.count(b"\r") == chunk.count(b"\r\n"):  # no bare CR: the fast search is exact
        return pattern.search(chunk) is not None
    return max(map(len, chunk.split(b"\r\n"))) > limit - 2


def now() -> float:
    return time.monotonic()
