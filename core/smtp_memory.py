"""Memory for message bodies: the bytes that the sessions of one process hold at once
(:class:`MemoryBudget`, taken chunk by chunk as DATA arrives, :mod:`tampu.smtp_wire`), and
giving the memory freed after large transfers back to the system (glibc's ``mallopt`` and
``malloc_trim``: :func:`tune_malloc`, :func:`give_memory_back`).
"""

from __future__ import annotations

import asyncio
import ctypes
from typing import Final

TRIM_AFTER: Final = 1024 * 1024
"""A transfer at least this big is followed by :func:`give_memory_back`."""
MMAP_THRESHOLD: Final = 256 * 1024
"""Allocations from this size on are their own memory mappings (returned when freed)."""


class MemoryBudget:
    """The bytes of message bodies that the sessions of one process hold at once.

    Each DATA transfer takes what it keeps, chunk by chunk, as it arrives; a transfer that
    would go past the limit stops keeping its body (it is read to its end and answered
    ``452``), so that many large messages at once cannot exhaust memory. What a session took
    is given back when its message is queued or refused.
    """

    def __init__(self) -> None:
        self.used = 0
        self.peak = 0
        self.refused = 0

    def available(self, limit: int) -> int:
        return max(0, limit - self.used)

    def take(self, n: int, limit: int) -> bool:
        if self.used + n > limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018 - glibc only (not musl)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
_trim_pending: set[asyncio.AbstractEventLoop] = set()


def tune_malloc() -> bool:
    """Have glibc give large blocks their own mappings (and so back to the system when they
    are freed), instead of its dynamic threshold, which after the first freed large block
    serves message-sized blocks from the heap, where freed memory stays resident.
    False when not glibc."""
    if _LIBC is None:
        return False
    ok = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)) and ok
    return ok


def trim_now() -> bool:
    """Return the free memory of every malloc arena to the system (glibc malloc_trim)."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))


def give_memory_back(loop: asyncio.AbstractEventLoop) -> None:
    """After a large transfer: trim the malloc arenas once the current burst is over (at most
    once per second per loop, so a stream of large messages does not trim at each one)."""
    if _LIBC is None or loop in _trim_pending:
        return
    _trim_pending.add(loop)

    def trim() -> None:
        _trim_pending.discard(loop)
        trim_now()

    loop.call_later(1.0, trim)
