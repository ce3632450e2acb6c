"""Which stores a process uses: the one place that reads ``[server] queue_store`` and
``state_store`` (``tampu serve``, ``tampu check`` and every command that touches the queue
or the state call :func:`make_stores`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tampu.backends import BackendFactory, FilesBackend, StoreBackend
from tampu.config import Config
from tampu.errors import ConfigError
from tampu.state_store import StateStore
from tampu.store import QueueStore

log = logging.getLogger("tampu.stores")

BUILTIN: dict[str, BackendFactory] = {"filesystem": FilesBackend, "files": FilesBackend}


def state_store_name(config: Config) -> str:
    """``[server] state_store``, or the queue's backend (``files`` for the filesystem)."""
    server = config.server
    if server.state_store:
        return server.state_store
    return "files" if server.queue_store == "filesystem" else server.queue_store


def backend_factories(names: set[str]) -> dict[str, BackendFactory]:
    """The core's backends, and the plugins' when ``names`` needs one of theirs."""
    found = dict(BUILTIN)
    if names - set(found):
        from tampu.caller import HookCaller
        from tampu.facade import Hooks
        from tampu.registry import cli_plugins

        def register(name: str, factory: BackendFactory) -> None:
            found.setdefault(name, factory)

        Hooks(HookCaller(cli_plugins(), {}, 30.0)).tampu_register_stores(register)
    return found


@dataclass(eq=False)
class Stores:
    """The queue store and the state store of one process, and the backends behind them."""

    queue: QueueStore
    state: StateStore
    backends: list[StoreBackend]

    async def open(self) -> None:
        """Connect every backend (a failure closes those already open, then raises)."""
        opened: list[StoreBackend] = []
        try:
            for backend in self.backends:
                await backend.open()
                opened.append(backend)
        except BaseException:
            for backend in reversed(opened):
                await backend.close()
            raise

    async def close(self) -> None:
        for backend in reversed(self.backends):
            try:
                await backend.close()
            except Exception as exc:  # closing must not hide the shutdown's other steps
                log.warning("closing store backend %s: %s", type(backend).__name__, exc)


def make_stores(config: Config) -> Stores:
    """The stores ``config`` names (nothing is connected before ``Stores.open``). Raises
    ConfigError for an unknown backend or a backend's wrong settings."""
    queue_name, state_name = config.server.queue_store, state_store_name(config)
    factories = backend_factories({queue_name, state_name})
    problems = []
    for key, name in (("queue_store", queue_name), ("state_store", state_name)):
        if name not in factories:
            where = config.origin_of(("server", key)) or "conf.d"
            problems.append(f"{where}: key server.{key}: unknown store {name!r} (available: "
                            f"{', '.join(sorted(factories))})")
    if problems:
        raise ConfigError(problems)
    made: dict[BackendFactory, StoreBackend] = {}
    for name in (queue_name, state_name):
        factory = factories[name]
        if factory not in made:
            made[factory] = factory(config)
    return Stores(made[factories[queue_name]].queue_store(),
                  made[factories[state_name]].state_store(), list(made.values()))
