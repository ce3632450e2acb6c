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
  A deadline that passes ends the connection with ``421``.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass
from typing import Final, cast

HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
MAX_WRITE_BUFFER: Final = 1024 * 1024
"""A client that does not read its replies is dropped past this much unsent output."""
RATE_WINDOW: Final = 60.0

_END = b"\r\n.\r\n"


class Closed(Exception):
    """The connection is gone (the client left, or a deadline ended it)."""


class LineTooLong(Exception):
    """A command line went past the limit; it was discarded up to its end."""


@dataclass(slots=True)
class DataResult:
    """One DATA transfer as read: the message (None when refused), and why it was refused."""

    message: bytes | None
    size: int
    too_big: bool = False
    line_too_long: bool = False


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
        if self._timer is not None:
            self._timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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

    def peek(self) -> bytes:
        return bytes(self._buf[:16])

    def pending_input(self) -> bool:
        return bool(self._buf)

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

    async def readline(self, deadline: float) -> bytes:
        """One line without its line ending. Raises Closed, LineTooLong."""
        armed = False
        discarding = False
        while True:
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

    async def read_data(self, max_size: int, deadline: float, min_rate: int) -> DataResult:
        """Read a DATA transfer up to ``CRLF . CRLF``: dot-unstuffed (RFC 5321 4.5.2),
        kept while within ``max_size``, lines checked against the limit. Only a CRLF-dot-CRLF
        ends it (a bare LF never does: no SMTP smuggling)."""
        self._buf[0:0] = b"\r\n"  # a virtual line start: the terminator may be the first line
        out = bytearray()
        size, first, too_big, too_long = -2, True, False, False
        long_line = re.compile(rb"[^\n]{%d,}" % (self.line_limit + 1))
        self.set_deadline(deadline)
        window_start, window_bytes = self.loop.time(), self.received
        while True:
            buf = self._buf
            end = buf.find(_END)
            done = end >= 0
            cut = end + 2 if done else buf.rfind(b"\r\n", 0, max(0, len(buf) - 4))
            if not done and cut <= 0 and len(buf) > self.line_limit + 6:
                # one long line and no CRLF yet: drop it as it comes, keep what could start
                # the terminator, after a byte that is no line start
                too_long = True
                size += len(buf) - 6
                buf[:] = b"\r\nX" + buf[-4:]
                continue
            if cut > 0:
                chunk = bytes(buf[:cut]).replace(b"\r\n.", b"\r\n")
                del buf[:cut]
                size += len(chunk)
                if not too_long and long_line.search(chunk):
                    too_long = True
                if size > max_size:
                    too_big = True
                if not (too_big or too_long):
                    out += chunk[2:] if first else chunk
                first = False
            if done:
                del buf[:3]  # ".\r\n"; what follows is the next command
                self.set_deadline(float("inf"))
                keep = not (too_big or too_long)
                return DataResult(bytes(out) if keep else None, max(0, size), too_big,
                                  too_long)
            if min_rate and self.loop.time() - window_start >= RATE_WINDOW:
                if self.received - window_bytes < min_rate * RATE_WINDOW:
                    raise Closed("too slow")
                window_start, window_bytes = self.loop.time(), self.received
            await self._more()

    # ---------------------------------------------------------------- TLS

    async def start_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> None:
        """Upgrade the connection (STARTTLS or an implicit-TLS listener). Raises OSError,
        ssl.SSLError or TimeoutError when the handshake fails; the connection is then gone."""
        assert self.transport is not None
        self.flush()
        old = self.transport
        try:
            new = await self.loop.start_tls(old, self, context, server_side=True,
                                            ssl_handshake_timeout=handshake_timeout)
        except BaseException:
            old.abort()
            self._eof = True
            raise
        if new is None:
            raise ConnectionResetError("TLS handshake failed")
        self.transport = new


def now() -> float:
    return time.monotonic()
