"""The running configuration: one object that owns the context, the hooks and the plugins.

:func:`build_runtime` is the one configuration check: ``tampu serve``, ``tampu check`` and a
reload all run it, so nothing that ``check`` calls valid fails at ``serve``. It validates what
the pydantic models cannot (files and directories, certificates, users files, every plugin's
settings and constructor) and collects every problem into one ConfigError.

A reload builds a new Runtime for the new configuration (sharing the store, the stash and the
DNS cache) and the server swaps its one reference to it.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tampu import hookspecs
from tampu.caller import HookCaller
from tampu.config import Config
from tampu.context import ServerContext
from tampu.decisions import DecisionRecorder, Journal
from tampu.dns import Resolver
from tampu.envelope import Stash
from tampu.errors import ConfigError
from tampu.facade import Hooks
from tampu.registry import Registry, build_registry
from tampu.state_store import StateStore
from tampu.store import QueueStore
from tampu.tls import ensure_self_signed, load_certificates, server_context


@dataclass(eq=False)
class Runtime:
    """Config, plugins and hooks of one configuration; the server holds exactly one."""

    context: ServerContext
    hooks: Hooks
    registry: Registry
    tls: ssl.SSLContext | None
    """The listening TLS context (certificates chosen by SNI), or None without certificates."""

    @property
    def config(self) -> Config:
        return self.context.config

    @property
    def store(self) -> QueueStore:
        return self.context.store

    def hook_order(self) -> dict[str, list[str]]:
        return self.hooks.order(hookspecs.HOOK_NAMES)


def selfsigned_dir(config: Config) -> Path:
    return config.data_dir / "selfsigned"


def ensure_certificates(config: Config) -> None:
    """``self_signed_cert = true`` and no certificate: make one now (once, atomically; the
    CLI calls this before reception workers fork)."""
    if config.server.self_signed_cert and not any(
            (p / "fullchain.pem").exists() for p in (config.certs_dir.iterdir()
                                                     if config.certs_dir.is_dir() else ())):
        ensure_self_signed(selfsigned_dir(config), config.server.hostname)


def preload(config: Config) -> None:
    """Import now what every process of ``serve`` will: the configured plugins' modules and the
    stores' (nothing is instantiated or opened). The CLI calls it before the reception
    workers fork, so that all processes share those pages; imports are most of a process's
    memory (measured with two workers: Pss 34 and 30 MiB against 41 and 39 MiB)."""
    from tampu.registry import preload_plugins
    from tampu.stores import make_stores

    preload_plugins(config)
    try:
        make_stores(config)  # imports the backends' modules; connects nothing
    except ConfigError:
        pass  # reported when the server builds its stores


def load_tls(config: Config) -> ssl.SSLContext | None:
    """The certificates of ``certs_dir`` (or the self-signed one made at start)."""
    certs = load_certificates(config.certs_dir)
    if not certs and config.server.self_signed_cert:
        certs = load_certificates(selfsigned_dir(config))
    return server_context(certs, config.server.hostname)


def check_environment(config: Config) -> list[str]:
    """What the models cannot check: directories that must be writable, certificates."""
    problems = []
    data = config.data_dir
    where = config.origin_of(("server", "data_dir")) or "conf.d"
    probe = data if data.exists() else next((p for p in data.parents if p.exists()), None)
    if data.exists() and not data.is_dir():
        problems.append(f"{where}: key server.data_dir: {data} is not a directory")
    elif probe is None or not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"{where}: key server.data_dir: {data} is not writable")
    try:
        certs = load_certificates(config.certs_dir)
    except ConfigError as exc:
        problems.extend(exc.problems)
        certs = {}
    if not certs and not config.server.self_signed_cert:
        for name, lst in config.server.listeners.items():
            if lst.kind == "submissions":
                origin = config.origin_of(("server", "listeners", name)) or "conf.d"
                problems.append(f"{origin}: listener {name}: kind submissions needs a "
                                f"certificate in {config.certs_dir}/<name>/ (or "
                                "self_signed_cert = true)")
    return problems


def build_runtime(config: Config, store: QueueStore, *, stash: Stash | None = None,
                  dns: Resolver | None = None, extra_plugins: list[Any] | None = None,
                  journal: Journal | None = None, state: StateStore | None = None) -> Runtime:
    """Validate ``config`` completely and load its plugins. Raises ConfigError (all problems).

    ``journal``: where the core's decision recorder writes (a serving process has one).
    ``state``: the state store (:func:`tampu.stores.make_stores`; default: local files)."""
    problems = check_environment(config)
    context = ServerContext(config, store, dns or Resolver.from_settings(
        config.server.dns_servers, config.server.dns_timeout), stash or Stash(),
        state_store=state)
    problems.extend(context.users.problems())
    extra = list(extra_plugins or [])
    if journal is not None and config.server.journal_max_size:
        extra.append(DecisionRecorder(journal))
    try:
        registry = build_registry(config, context, extra)
    except ConfigError as exc:
        problems.extend(exc.problems)
    tls = None
    if not problems:
        try:
            tls = load_tls(config)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    caller = HookCaller(registry.pm, registry.ordering, config.server.plugin_timeout,
                        hook_timeouts={"deliver": config.server.delivery_timeout,
                                       "deliver_batch": config.server.delivery_timeout},
                        plugin_timeouts=registry.plugin_timeouts,
                        observers=context.hook_observers)
    runtime = Runtime(context, Hooks(caller), registry, tls)
    context.plugin_order = {h: names for h, names in runtime.hook_order().items() if names}
    return runtime
