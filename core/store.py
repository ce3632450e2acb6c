"""The queue store interface: where queue items live until they are delivered.

A store keeps each item's envelope, recipients' state and message bytes, durably. It never
calls hooks and knows nothing of delivery: :mod:`tampu.intake` puts items in, the delivery
loop reads and updates them. The filesystem store (:mod:`tampu.store_files`) is the
embedded default; other stores (PostgreSQL) implement the same methods.

Rules every store keeps:

* ``put`` returns only once the item survives a crash at any instant (fsync or a committed
  transaction): the SMTP ``250`` is sent after it; a store that learns of it earlier may
  call :data:`ON_DURABLE` (then the ``250`` goes at once);
* ``save_state`` is durable before it returns, so a restart never redoes a finished recipient;
* ``remove`` may lose its effect in a crash (the item is then delivered again: twice is
  allowed, zero times is not).
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tampu.item import QueueItem

_ID_RE = re.compile(r"^[a-z0-9]{1,64}$")

@dataclass(eq=False)
class Durable:
    """What :data:`ON_DURABLE` holds: the SMTP session's ``250`` for one new item."""

    item_id: str
    send: Callable[[int], None]
    """Called on the event loop once the item is durable, with how many bytes of ``reply``
    the store's syncer wrote to the client itself (0: none, the session sends it all; -1:
    unknown, the syncer died after the sync: the session ends the connection). Later calls
    are ignored."""
    reply: bytes = b""
    socket: Callable[[], int] | None = None
    """Asked on the event loop right before a sync is requested: the client socket's
    descriptor when a syncer may write ``reply`` on it itself (valid until the loop runs
    on: pass it on at once, e.g. with ``SCM_RIGHTS``), else -1 (other output pending, TLS).
    None once the session no longer waits. The syncer writes the moment its sync returns,
    never when it failed, and sets :attr:`sent`."""
    sent: int = 0

    def __call__(self, item_id: str) -> None:
        if item_id == self.item_id:
            self.send(self.sent)


ON_DURABLE: ContextVar[Durable | None] = ContextVar("on_durable", default=None)
"""Set by the SMTP session around its submit: a store may call it, on the event loop and
with the item's ID, the moment a new item is durable, before its ``put`` returns (the
filesystem store calls it from the completion of the group commit's sync, whose helper
writes the ``250`` itself: it skips the busy loop's turn). A store that never calls it is
correct too: the ``250`` is then sent when ``put`` returns. Tasks started meanwhile inherit
the variable: it ignores every ID but its own, and a second call."""


class QueueStore(Protocol):
    """What the core needs of a queue store."""

    max_items: int

    def new_id(self) -> str: ...

    def full(self) -> bool:
        """True when new mail must get ``452 4.3.1`` (cheap: called at every MAIL FROM)."""
        ...

    async def put(self, item: QueueItem, message: bytes) -> None:
        """Store a new item durably. Raises QueueError or OSError (nothing is stored then)."""
        ...

    async def save_state(self, item: QueueItem) -> None:
        """Store the item's delivery state durably (nothing if the item is gone)."""
        ...

    async def remove(self, item: QueueItem) -> None: ...

    async def exists(self, item_id: str) -> bool: ...

    async def load(self, item_id: str) -> QueueItem:
        """One item with its state. Raises QueueError for a missing or corrupt item."""
        ...

    async def read_message(self, item_id: str) -> bytes: ...

    def defer_sync(self, item_id: str, path: Path) -> bool:
        """For delivery backends writing files (any thread): True when the store makes what
        is written under ``path`` for ``item_id`` durable itself (before the item leaves the
        queue, and before a state that says it was delivered), so the backend need not
        fsync; False: the backend syncs its files."""
        ...

    async def ids(self) -> list[str]:
        """Every item's ID, oldest first."""
        ...

    async def recover(self) -> list[str]:
        """At start: clean up after a crash; the IDs of the items to resume, oldest first.

        Cheap even for a big queue: the delivery loop loads the items afterwards with
        :meth:`load`, a few at a time while mail is being received (an unreadable one is
        then set aside with :meth:`quarantine`)."""
        ...

    async def quarantine(self, item_id: str, reason: str) -> None:
        """Set an unreadable item aside for an operator to look at."""
        ...

    async def request(self, action: str, ids: list[str]) -> None:
        """Leave an operator request (``retry``, ``delete``, ``hold``, ``release``) for the
        running server; ``ids`` empty means every item."""
        ...

    async def take_requests(self) -> list[tuple[str, str]]:
        """The pending operator requests as (action, ID or ``all``), removed as taken."""
        ...


def valid_id(item_id: str) -> bool:
    """A queue ID as tampu makes them (so it is safe as a file name)."""
    return bool(_ID_RE.match(item_id))


def format_age(seconds: float) -> str:
    """An item's age for people: ``42s``, ``17m``, ``3.5h``."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


class _QueueIds:
    """Queue IDs: time (ms), a per-process random prefix and a counter; no syscall per ID."""

    def __init__(self) -> None:
        self.pid = -1
        self.prefix = b""
        self.counter = itertools.count()

    def set_prefix(self, prefix: bytes) -> None:
        self.pid = os.getpid()
        self.prefix = prefix
        self.counter = itertools.count(secrets.randbelow(1 << 16))

    def next(self) -> str:
        if self.pid != os.getpid():  # first use, or a forked reception worker
            self.set_prefix(secrets.token_bytes(3))
        raw = (int(time.time() * 1000).to_bytes(6, "big") + self.prefix
               + (next(self.counter) & 0xFFFF).to_bytes(2, "big"))
        return base64.b32encode(raw).decode().lower().rstrip("=")


_ids = _QueueIds()


def new_queue_id() -> str:
    """Sortable by time (ms), 18 characters of lower-case base32."""
    return _ids.next()


ID_PREFIX_BYTES = 3


def set_id_prefix(prefix: bytes) -> None:
    """The 3 bytes this process puts in the queue IDs it makes (the worker manager gives each
    process its own, so that an item's ID says which process queued it)."""
    if len(prefix) != ID_PREFIX_BYTES:
        raise ValueError("a queue ID prefix is 3 bytes")
    _ids.set_prefix(prefix)


def id_prefix(item_id: str) -> bytes | None:
    """The process prefix in a queue ID made by :func:`new_queue_id` (None for other IDs)."""
    if len(item_id) != 18:
        return None
    try:
        raw = base64.b32decode(item_id.upper() + "======")
    except ValueError:
        return None
    return raw[6:9] if len(raw) == 11 else None
