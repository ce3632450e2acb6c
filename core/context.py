"""What a plugin gets: the server context (shared) and its own plugin context."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tampu.config import Config, PluginSettings
from tampu.envelope import Stash
from tampu.files import FileStamp, Stamp

if TYPE_CHECKING:
    from collections.abc import Sequence

    import dns.asyncresolver

    from tampu.caller import Hooks
    from tampu.item import Recipient
    from tampu.queue import Queue

S = TypeVar("S", bound=PluginSettings)


def domain_of(address: str) -> str:
    """The domain of ``user@domain`` (lower-cased), or "" when there is none."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def split_address(address: str) -> tuple[str, str]:
    user, _, domain = address.rpartition("@")
    if not _:
        return address, ""
    return user, domain.lower()


@dataclass(eq=False)
class ServerContext:
    """The server as plugins see it. One per server (and per worker process)."""

    config: Config
    hooks: Hooks | None = None
    queue: Queue | None = None
    stash: Stash = field(default_factory=Stash)
    _domains_cache: tuple[Stamp | None, frozenset[str]] | None = None
    _domains_stamp: FileStamp | None = None
    _resolver: Any = None

    @property
    def settings(self) -> Any:
        return self.config.server

    @property
    def config_dir(self) -> Path:
        return self.config.config_dir

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def hostname(self) -> str:
        return str(self.config.server.hostname)

    def local_domains(self) -> frozenset[str]:
        """``[server] local_domains`` and each ``domains/<domain>/`` folder (re-read on change)."""
        ddir = self.config.domains_dir
        if self._domains_stamp is None:
            self._domains_stamp = self.file_stamp(ddir)
        stamp = self._domains_stamp.stamp()
        if self._domains_cache is None or stamp != self._domains_cache[0]:
            names = set()
            if stamp is not None:
                names = {p.name.lower() for p in ddir.iterdir() if p.is_dir()}
            names.update(d.lower() for d in self.config.server.local_domains)
            self._domains_cache = (stamp, frozenset(names))
        return self._domains_cache[1]

    def file_stamp(self, path: Path) -> FileStamp:
        """A FileStamp for ``path`` checked every ``[server] file_check_interval``."""
        return FileStamp(path, self.config.server.file_check_interval)

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.local_domains()

    def is_local_address(self, address: str) -> bool:
        return self.is_local_domain(domain_of(address))

    def is_local_mailbox(self, recipient: Recipient, domains: Sequence[str] = ()) -> bool:
        """For local delivery backends: a recipient in a local domain (and in ``domains``, if
        given) that is not a pipe or a ``via`` route, which other backends handle."""
        if "pipe" in recipient.route or "via" in recipient.route:
            return False
        domain = domain_of(recipient.address)
        if not domain or not self.is_local_domain(domain):
            return False
        return not domains or domain in domains

    def normalize_user(self, user: str) -> str:
        """The lookup form of a local user: lower case, suffix and drop characters removed."""
        settings = self.config.server
        user = user.lower()
        for sep in settings.suffix_separators:
            user = user.split(sep, 1)[0]
        for ch in settings.drop_characters:
            user = user.replace(ch, "")
        return user

    def resolver(self) -> dns.asyncresolver.Resolver:
        """A dnspython async resolver using ``[server] dns_servers`` (or resolv.conf)."""
        if self._resolver is None:
            import dns.asyncresolver

            servers = self.config.server.dns_servers
            res = dns.asyncresolver.Resolver(configure=not servers)
            if servers:
                res.nameservers = []
                ports: dict[str, int] = {}
                for spec in servers:
                    host, port = parse_dns_server(spec)
                    res.nameservers.append(host)
                    ports[host] = port
                res.nameserver_ports = ports
            res.lifetime = self.config.server.dns_timeout
            res.timeout = self.config.server.dns_timeout
            self._resolver = res
        return self._resolver


def parse_dns_server(spec: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` (a ``[server] dns_servers`` entry)."""
    if spec.startswith("["):
        host, _, port = spec[1:].partition("]:")
        return host.rstrip("]"), int(port or 53)
    if spec.count(":") == 1:
        host, _, port = spec.partition(":")
        return host, int(port)
    return spec, 53


@dataclass(eq=False)
class PluginContext(Generic[S]):
    """Given to a class-based plugin's constructor: its name, settings and the server."""

    name: str
    settings: S
    server: ServerContext

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"tampu.plugins.{self.name}")

    def path(self, relative: str | os.PathLike[str]) -> Path:
        """A path in the configuration directory (absolute paths are kept as they are)."""
        return self.server.config_dir / relative
