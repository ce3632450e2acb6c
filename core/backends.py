"""Store backends: what provides a server's queue store and state store.

``[server] queue_store`` and ``state_store`` name a backend. ``filesystem`` (also called
``files``) is the core's own: the queue directory and :class:`tampu.state_store.LocalStateStore`.
Plugins add others with the ``tampu_register_stores(register)`` hook (``queue_postgres``
registers ``postgres``); :mod:`tampu.stores` picks them.

A queue store that several nodes share is a :class:`SharedQueueStore`: items are delivered by
whichever node *claims* them, under a lease that the node renews while it works and that
expires when it dies, so that another node takes the item over.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from tampu.config import Config
from tampu.state_store import LocalStateStore, StateStore
from tampu.store import QueueStore


@runtime_checkable
class SharedQueueStore(QueueStore, Protocol):
    """A queue store shared by several nodes: delivery goes by claims and leases."""

    node: str
    """This node's name, recorded with each lease."""
    lease_on_put: bool
    """Whether ``put`` leases the new item to this node (a process that delivers: it takes
    the item at once, with its bytes in memory); otherwise any node claims it."""
    claim_batch: int
    """Items claimed per ``claim``."""
    max_in_flight: int
    """Items this node delivers at once: no claims beyond."""
    poll_interval: float
    """Seconds the claim loop waits for a notification before it looks anyway."""

    async def claim(self, limit: int) -> list[str]:
        """Lease up to ``limit`` due items (not held, retry time reached, no live lease) to
        this node, oldest first. The store renews the leases it holds until ``release``."""
        ...

    async def release(self, item_id: str) -> None:
        """Give up the lease: the item is due again at the retry time saved with its state
        (at once if an operator asked for a retry meanwhile)."""
        ...

    async def wait_due(self, at_most: float) -> None:
        """Return when items may have become due (another node or ``tampu queue`` said so),
        or after ``at_most`` seconds."""
        ...

    async def apply(self, action: str, ids: list[str]) -> int:
        """An operator's ``retry``, ``hold``, ``release`` or ``delete`` for ``ids`` (empty:
        every item), applied now; every node sees it. Returns the number of items changed."""
        ...

    async def holders(self) -> dict[str, tuple[str, float]]:
        """Items under a live lease: ID -> (node, lease expiry as time.time())."""
        ...

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Health and lag of this node as last measured: name -> (help, value). Cheap (no
        I/O): for the metrics plugin."""
        ...


@runtime_checkable
class StoreBackend(Protocol):
    """One backend: it makes the stores and opens (connects) and closes them."""

    def queue_store(self) -> QueueStore: ...

    def state_store(self) -> StateStore: ...

    async def open(self) -> None:
        """Connect (at start, before the start-up hooks). Raises TampuError or OSError."""
        ...

    async def close(self) -> None: ...


BackendFactory = Callable[[Config], StoreBackend]
"""Makes a backend for a validated configuration (nothing connects before ``open``); raises
ConfigError when the backend's own settings are wrong."""
RegisterBackend = Callable[[str, BackendFactory], None]
"""``register(name, factory)``, given to ``tampu_register_stores``."""


class FilesBackend:
    """The embedded default: ``<data_dir>/queue`` and files plus memory for state."""

    def __init__(self, config: Config) -> None:
        self.data_dir: Path = config.data_dir
        self.max_items = config.server.max_queue_items
        self._state: LocalStateStore | None = None

    def queue_store(self) -> QueueStore:
        from tampu.store_files import FilesystemStore

        return FilesystemStore(self.data_dir / "queue", self.max_items)

    def state_store(self) -> StateStore:
        if self._state is None:
            self._state = LocalStateStore(self.data_dir)
        return self._state

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None
