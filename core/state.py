"""What every connection and the delivery loop share: the one reference to the running
configuration, the open connections and the background tasks (after uvicorn's ServerState).

``runtime`` is the only place that holds the hooks: a reload assigns a new Runtime here, and
every session and delivery reads it at each step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from tampu.runtime import Runtime


class Connection(Protocol):
    """What the server needs of an open SMTP connection at shutdown."""

    @property
    def idle(self) -> bool: ...

    def close_for_shutdown(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(eq=False)
class ServerState:
    runtime: Runtime
    connections: set[Connection] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    stopping: bool = False

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background; shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
