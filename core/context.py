"""What a plugin gets: the server context (shared) and its own plugin context.

A :class:`ServerContext` is made for each configuration (at start and on every reload) and
owns what the plugins share: the validated configuration, the queue store, the local domains
and users, the DNS resolver and the server stash. It holds no hooks: the core's
:class:`tampu.runtime.Runtime` pairs a context with the hooks built for it.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from tampu.addresses import domain_of, lookup_key, split_address
from tampu.config import Config, PluginSettings, ServerSettings
from tampu.dns import Resolver
from tampu.envelope import Stash
from tampu.files import FileStamp
from tampu.item import Recipient
from tampu.state_store import LocalStateStore, StateStore
from tampu.store import QueueStore
from tampu.users import Domains, UserDirectory

S = TypeVar("S", bound=PluginSettings)

HookObserver = Callable[[str, str, float, str], None]
"""Called with (hook, plugin, seconds, outcome ok|error|timeout) for sampled hook calls
(for every call if the observer has an ``every_call = True`` attribute: the test kit's)."""


@dataclass(eq=False)
class ServerContext:
    """The server as plugins see it. One per configuration (and per worker process)."""

    config: Config
    store: QueueStore
    dns: Resolver
    stash: Stash = field(default_factory=Stash)
    """Server-wide plugin state; survives reloads (plugins hand state over through it)."""
    state_store: InitVar[StateStore | None] = None
    state: StateStore = field(init=False)
    """Policy state shared by this server's processes and, with PostgreSQL, by every node
    (``[server] state_store``): security levels, counters, triplets. Survives reloads."""
    domains: Domains = field(init=False)
    users: UserDirectory = field(init=False)
    node: str = ""
    """This node's name in records shared with other nodes (the hostname by default)."""
    hook_observers: list[HookObserver] = field(default_factory=list)
    """Observers of hook timings (metrics); the hooks of this configuration call them."""
    plugin_order: dict[str, list[str]] = field(default_factory=dict)
    """The enabled plugins on each hook, in call order (filled once the plugins are loaded)."""

    def __post_init__(self, state_store: StateStore | None) -> None:
        server = self.config.server
        self.state = state_store if state_store is not None else LocalStateStore(
            self.config.data_dir)
        self.domains = Domains(self.config.domains_dir, server.local_domains,
                               server.file_check_interval)
        self.users = UserDirectory(self.domains, server.suffix_separators,
                                   server.drop_characters, server.file_check_interval)
        self.node = self.node or self.config.node

    @property
    def settings(self) -> ServerSettings:
        return self.config.server

    @property
    def config_dir(self) -> Path:
        return self.config.config_dir

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def hostname(self) -> str:
        return self.config.server.hostname

    def local_domains(self) -> frozenset[str]:
        """``[server] local_domains`` and each ``domains/<domain>/`` folder, canonical."""
        return self.domains.all()

    def file_stamp(self, path: Path) -> FileStamp:
        """A FileStamp for ``path`` checked every ``[server] file_check_interval``."""
        return FileStamp(path, self.config.server.file_check_interval)

    def is_local_domain(self, domain: str) -> bool:
        return self.domains.is_local(domain)

    def is_local_address(self, address: str) -> bool:
        return self.domains.is_local(domain_of(address))

    def mailbox_of(self, address: str) -> tuple[str, str]:
        """(user, domain) naming the mailbox of a local ``address``: the user's lookup form
        (case-mapped, no suffix, no drop characters) and the canonical domain. Every
        spelling of an address (``J.Doe+x@XN--...``) names the same mailbox."""
        user, _ = split_address(address)
        settings = self.config.server
        return lookup_key(user, settings.suffix_separators, settings.drop_characters), \
            domain_of(address)

    def is_local_mailbox(self, recipient: Recipient, domains: list[str] | None = None) -> bool:
        """For local delivery backends: a recipient in a local domain (and in ``domains``,
        if given) whose route is not a pipe or a ``via``, which other backends handle."""
        if recipient.route.pipe is not None or recipient.route.via:
            return False
        domain = domain_of(recipient.address)
        if not domain or not self.domains.is_local(domain):
            return False
        return not domains or domain in {self.domains.canonical(d) for d in domains}


@dataclass(eq=False)
class PluginContext(Generic[S]):
    """Given to a class-based plugin's constructor: its name, settings and the server."""

    name: str
    settings: S
    server: ServerContext

    @functools.cached_property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"tampu.plugins.{self.name}")

    def path(self, relative: str | os.PathLike[str]) -> Path:
        """A path in the configuration directory (absolute paths are kept as they are)."""
        return self.server.config_dir / relative
