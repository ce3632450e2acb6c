"""conf.d loading and validation.

A configuration directory holds ``conf.d/*.toml``, read in lexical order and merged (a later
file overrides keys of an earlier one, tables merge key by key). ``[server]`` configures the
core (ServerSettings); ``[plugins.NAME]`` enables (``enabled = true``) and configures plugin
NAME against that plugin's ``Settings`` model. Every error names the file, the key and the
problem; nothing is started until the whole configuration is valid.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from tampu.envelope import ListenerKind
from tampu.errors import ConfigError

DEFAULT_PORTS: dict[str, int] = {"smtp": 25, "submission": 587, "submissions": 465}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerSettings(_Strict):
    kind: ListenerKind = Field(description="smtp (MX, port 25), submission (587, AUTH "
                               "required), or submissions (465, implicit TLS, AUTH required).")
    addresses: list[str] = Field(
        default_factory=list,
        description="host:port pairs to listen on; [::1]:25 for IPv6. Empty: the kind's "
        "default port on all addresses.",
    )
    proxy_protocol: bool = Field(
        default=False, description="Expect a PROXY protocol header (v1 or v2) first, from "
        "proxy_trusted sources only; other sources are disconnected. Not on submissions."
    )
    proxy_trusted: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Networks (CIDR) of the proxies allowed to send a PROXY header on this "
        "listener.",
    )

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[str]) -> list[str]:
        for addr in value:
            split_hostport(addr)
        return value

    @field_validator("proxy_trusted")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad network
        return value

    @field_validator("proxy_protocol")
    @classmethod
    def _proxy_before_tls(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("kind") == "submissions":
            raise ValueError("proxy_protocol is not supported on kind submissions (implicit "
                             "TLS comes first); use a submission listener, or let the proxy "
                             "pass TLS through to a listener without PROXY")
        return value

    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) pairs to bind: the addresses, or the kind's default port."""
        if not self.addresses:
            return [("", DEFAULT_PORTS[self.kind])]
        return [split_hostport(a) for a in self.addresses]


def split_hostport(addr: str) -> tuple[str, int]:
    """``127.0.0.1:25`` / ``[::1]:25`` / ``:25`` → (host, port); raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{addr!r} is not host:port")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError(f"{addr!r} is not host:port (write IPv6 addresses as [::1]:25)")
    host = host.strip("[]")
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOSTNAME.match(host):
                raise ValueError(f"{addr!r}: {host!r} is not an IP address or host name"
                                 ) from None
    return host, int(port)


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class ServerSettings(_Strict):
    """``[server]``: the core's settings."""

    hostname: str = Field(default="localhost", description="Name in the greeting, in "
                          "Received headers and in the HELO of outgoing mail.")
    node: str = Field(default="", description="This node's name in records shared with "
                      "other nodes (queue leases, decision records); unique per node. Empty: "
                      "the hostname.")
    queue_store: str = Field(
        default="filesystem", description="Where the queue lives: filesystem (<data_dir>/"
        "queue, the embedded default) or postgres (shared by several nodes; configure "
        "[plugins.queue_postgres]). Changes apply at the next start.")
    state_store: str = Field(
        default="", description="Where shared state lives (domaininfo levels, rate-limit and "
        "AUTH-failure counters, greylisting): files (files and memory of this node) or "
        "postgres. Empty: postgres when queue_store is postgres, else files.")
    data_dir: str = Field(default="data", description="Queue and state; relative paths are "
                          "relative to the configuration directory.")
    local_domains: list[str] = Field(
        default_factory=list,
        description="Domains delivered locally, in addition to each domains/<domain>/ folder.",
    )
    local_socket: str = Field(
        default="sendmail.sock", description="The UNIX socket (in data_dir) where local "
        "programs submit mail with `tampu sendmail`; the server knows the submitting user "
        "from the socket. Empty: none.")
    suffix_separators: str = Field(
        default="+", description="Characters that start an address suffix (user+tag): "
        "ignored when looking up local users and aliases.")
    drop_characters: str = Field(
        default=".", description="Characters ignored in the user part of local addresses "
        "when looking up users and aliases (j.doe = jdoe).")
    listeners: dict[str, ListenerSettings] = Field(
        default_factory=dict, description="Listeners by name: [server.listeners.NAME]."
    )
    certs_dir: str = Field(default="certs", description="Certificates: <certs_dir>/<name>/"
                           "fullchain.pem and privkey.pem, chosen by SNI.")
    self_signed_cert: bool = Field(
        default=False,
        description="Make a self-signed certificate for hostname at start if certs_dir has "
        "none (for trying tampu out; real servers use real certificates).",
    )
    max_message_size: int = Field(default=50 * 1024 * 1024, gt=0,
                                  description="Largest message in bytes, advertised in SIZE.")
    max_recipients: int = Field(default=100, gt=0, description="Recipients per message.")
    max_line_length: int = Field(default=1000, ge=512,
                                 description="Longest command or text line, CRLF included.")
    command_timeout: float = Field(
        default=60.0, gt=0, description="Seconds a client has to send each command line, "
        "counted from the previous reply (chasquid: 1 minute).")
    session_timeout: float = Field(
        default=1200.0, gt=0, description="Seconds a connection may last in all, DATA "
        "transfers aside (chasquid: 20 minutes).")
    data_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a DATA transfer may take at least; the "
        "deadline grows with max_message_size / min_data_rate when that is longer.")
    min_data_rate: int = Field(
        default=8192, ge=0, description="Bytes per second a DATA transfer must average over "
        "each minute (data_timeout when shorter); slower clients are disconnected (421). "
        "0: no minimum.")
    tls_handshake_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a TLS handshake (STARTTLS or implicit TLS) "
        "may take.")
    max_connections: int = Field(default=1000, gt=0,
                                 description="Concurrent connections per process.")
    reception_memory: int = Field(
        default=256 * 1024 * 1024, gt=0, description="Bytes of message bodies the sessions "
        "of one process may hold at once while receiving (never less than max_message_size); "
        "past it a transfer is refused with 452 (and MAIL FROM with a larger SIZE at once).")
    max_errors: int = Field(
        default=3, gt=0, description="Errors a session may make (5xx replies: bad syntax, "
        "unknown commands, failed AUTH, refused recipients beyond free_refused_recipients) "
        "before it gets 421 and is closed (chasquid: 3).")
    free_refused_recipients: int = Field(
        default=10, ge=0, description="Refused recipients per session that do not count as "
        "errors (a sender cleaning a list is not an attacker).")
    max_queue_items: int = Field(default=200, gt=0,
                                 description="Items in the queue before new mail gets 452.")
    file_check_interval: float = Field(
        default=1.0, ge=0, description="Seconds between checks of files re-read when they "
        "change (users, aliases, domains/, hook programs).")
    plugin_timeout: float = Field(default=30.0, gt=0,
                                  description="Seconds one hook implementation may take.")
    delivery_timeout: float = Field(
        default=900.0, gt=0, description="Seconds one delivery attempt (the deliver hook) may "
        "take; long enough for RFC 5321's SMTP timeouts.")
    max_deliveries: int = Field(
        default=100, gt=0, description="Queue items being delivered at once, all delivery "
        "backends together (Postfix: default_process_limit 100); others wait their turn, "
        "taken in turn by destination domain.")
    shutdown_timeout: float = Field(default=30.0, ge=0,
                                    description="Seconds open transactions get at shutdown.")
    workers: int = Field(default=1, ge=1, le=64,
                         description="Reception processes sharing the listeners (SO_REUSEPORT).")
    retry_schedule: list[float] = Field(
        default_factory=lambda: [60.0, 300.0, 600.0, 1200.0],
        description="Delays between delivery rounds in seconds; the last one repeats.",
    )
    give_up_after: float = Field(default=20 * 3600.0, gt=0,
                                 description="Seconds after which undelivered mail bounces.")
    delay_warning_after: float = Field(
        default=4 * 3600.0, ge=0, description="Seconds after which recipients that asked for "
        "it (NOTIFY=DELAY, RFC 3461) get one delay notification; 0: never.")
    journal_max_size: int = Field(
        default=64 * 1024 * 1024, ge=0, description="Bytes the decision journal "
        "(<data_dir>/journal/, what `tampu why` reads) may take in all; the oldest files go "
        "first. 0: no journal.")
    journal_max_age: float = Field(
        default=30 * 86400.0, ge=0, description="Seconds a decision record is kept at most; "
        "0: no age limit (only the size limit).")
    dns_servers: list[str] = Field(
        default_factory=list,
        description="DNS servers as IP or IP:port ([v6]:port); empty: the system's "
        "resolv.conf. DANE needs a validating resolver here (e.g. unbound on 127.0.0.1).",
    )
    dns_timeout: float = Field(default=5.0, gt=0, description="Seconds per DNS lookup.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Level of the server log."
    )

    @field_validator("dns_servers")
    @classmethod
    def _check_dns(cls, value: list[str]) -> list[str]:
        from tampu.dns import parse_server

        for server in value:
            parse_server(server)  # ValueError names the entry
        return value

    @field_validator("local_domains")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        from tampu.addresses import normalize_domain

        return [normalize_domain(d) for d in value]  # AddressError (a ValueError) names it

    def listener_conflicts(self) -> list[tuple[str, str]]:
        """(listener, problem) for each listener that would bind an address another
        listener binds (a wildcard host takes the port on every address)."""
        out = []
        seen: dict[tuple[str, int], str] = {}
        for name, lst in self.listeners.items():
            for host, port in lst.endpoints():
                if port == 0:
                    continue  # ephemeral: each gets its own
                for (other_host, other_port), other in seen.items():
                    if port == other_port and (host == other_host or not host or not other_host):
                        out.append((name, f"listeners {other} and {name} both listen on "
                                          f"{host or '*'}:{port}"))
                seen[(host, port)] = name
        return out


class PluginSettings(BaseModel):
    """Base of every plugin's ``Settings``: ``[plugins.NAME]`` is validated against it.

    ``enabled`` and ``priority`` are the core's; add your own fields with a ``description``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=False, description="Load this plugin.")
    priority: int = Field(default=100, description="Order on each hook: lower runs first; ties "
                          "go by conf.d order.")
    hook_timeout: float | None = Field(
        default=None, gt=0, description="Seconds each hook call of this plugin may take; "
        "default: [server] plugin_timeout (delivery_timeout for deliver).")

    secret_fields: ClassVar[tuple[str, ...]] = ()


@dataclass
class PluginTable:
    """One ``[plugins.NAME]`` table as merged from conf.d, not yet validated."""

    name: str
    values: dict[str, Any]
    order: int
    files: list[Path] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.values.get("enabled") is True


@dataclass
class Config:
    """A validated server configuration plus the raw plugin tables."""

    config_dir: Path
    server: ServerSettings
    plugins: dict[str, PluginTable]
    files: list[Path]
    origins: dict[tuple[str, ...], Path] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return (self.config_dir / self.server.data_dir).resolve()

    @property
    def node(self) -> str:
        """This node's name: ``[server] node``, else the hostname."""
        return self.server.node or self.server.hostname

    @property
    def certs_dir(self) -> Path:
        return (self.config_dir / self.server.certs_dir).resolve()

    @property
    def domains_dir(self) -> Path:
        return self.config_dir / "domains"

    def origin_of(self, loc: tuple[str, ...]) -> Path | None:
        """The conf.d file that set the key at ``loc`` (or its closest parent)."""
        for n in range(len(loc), 0, -1):
            found = self.origins.get(tuple(loc[:n]))
            if found is not None:
                return found
        return None


def _merge(into: dict[str, Any], new: dict[str, Any], path: tuple[str, ...], src: Path,
           origins: dict[tuple[str, ...], Path]) -> None:
    for key, value in new.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            origins.setdefault(here, src)
            _merge(into[key], value, here, src, origins)
        else:
            into[key] = value
            origins[here] = src
            if isinstance(value, dict):
                _record(value, here, src, origins)


def _record(table: dict[str, Any], path: tuple[str, ...], src: Path,
            origins: dict[tuple[str, ...], Path]) -> None:
    for key, value in table.items():
        origins[(*path, key)] = src
        if isinstance(value, dict):
            _record(value, (*path, key), src, origins)


def format_validation_error(err: ValidationError, prefix: tuple[str, ...],
                            origin: Any) -> list[str]:
    """One line per problem: ``FILE: key a.b.c: message``."""
    out = []
    for e in err.errors():
        loc = (*prefix, *(str(p) for p in e["loc"]))
        src = origin(loc)
        where = str(src) if src else "conf.d"
        key = ".".join(loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{where}: key {key}: {msg}")
    return out


def resolve_secrets(values: dict[str, Any], config_dir: Path) -> dict[str, Any]:
    """Replace ``{"$env": "NAME"}`` and ``{"$file": "path"}`` values (or the strings
    ``"$env:NAME"``, ``"$file:path"``) by what they point at."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str) and value.startswith(("$env:", "$file:")):
            kind, _, ref = value.partition(":")  # the string forms: "$env:NAME", "$file:path"
            value = {kind: ref}
        if isinstance(value, dict) and set(value) == {"$env"}:
            env = value["$env"]
            if env not in os.environ:
                raise ValueError(f"key {key}: environment variable {env} is not set")
            out[key] = os.environ[env]
        elif isinstance(value, dict) and set(value) == {"$file"}:
            path = config_dir / value["$file"]
            try:
                out[key] = path.read_text().strip()
            except OSError as exc:
                raise ValueError(f"key {key}: cannot read {path}: {exc.strerror}") from exc
        else:
            out[key] = value
    return out


def load_config(config_dir: Path | str) -> Config:
    """Read, merge and validate ``config_dir/conf.d/*.toml``. Raises ConfigError.

    A chasquid directory with no conf.d (``chasquid.conf`` beside ``domains/`` and
    ``certs/``) is read as it is: the conf.d that ``tampu import chasquid`` would write is
    made in memory from chasquid.conf (docs/coming-from-chasquid.md lists the fields).
    """
    cdir = Path(config_dir).resolve()
    confd = cdir / "conf.d"
    problems: list[str] = []
    sources: list[tuple[Path, str | None]] = []
    if confd.is_dir():
        sources = [(p, None) for p in sorted(confd.iterdir())
                   if p.suffix == ".toml" and not p.name.startswith(".")]
    elif (cdir / "chasquid.conf").is_file():
        from tampu.chasquid import ChasquidError, TextFormatError, confd_for_chasquid_dir

        try:
            texts = confd_for_chasquid_dir(cdir) or {}
        except (ChasquidError, TextFormatError, OSError) as exc:
            raise ConfigError([f"{cdir / 'chasquid.conf'}: {exc}"]) from None
        sources = [(cdir / "chasquid.conf", texts[name]) for name in sorted(texts)]
    else:
        raise ConfigError([f"{confd}: no such directory (expected conf.d/*.toml, or a "
                           "chasquid.conf to read as it is)"])
    files = list(dict.fromkeys(path for path, _ in sources))
    merged: dict[str, Any] = {}
    origins: dict[tuple[str, ...], Path] = {}
    plugin_order: list[str] = []
    for path, text in sources:
        try:
            if text is not None:
                data = tomllib.loads(text)
            else:
                with path.open("rb") as fh:
                    data = tomllib.load(fh)
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror}")
            continue
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"{path}: not valid TOML: {exc}")
            continue
        for top in data:
            if top not in ("server", "plugins"):
                problems.append(f"{path}: key {top}: unknown section (expected [server] or "
                                "[plugins.NAME])")
        plugins = data.get("plugins", {})
        if not isinstance(plugins, dict):
            problems.append(f"{path}: key plugins: must be a table of [plugins.NAME] tables")
            continue
        for name, table in plugins.items():
            if not isinstance(table, dict):
                problems.append(f"{path}: key plugins.{name}: must be a table")
            elif name not in plugin_order:
                plugin_order.append(name)
        _merge(merged, {k: v for k, v in data.items() if k in ("server", "plugins")},
               (), path, origins)
    if problems:
        raise ConfigError(problems)

    def origin(loc: tuple[str, ...]) -> Path | None:
        for n in range(len(loc), 0, -1):
            if tuple(loc[:n]) in origins:
                return origins[tuple(loc[:n])]
        return None

    try:
        server = ServerSettings.model_validate(merged.get("server", {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, ("server",), origin)) from None
    conflicts = [f"{origin(('server', 'listeners', name, 'addresses')) or 'conf.d'}: key "
                 f"server.listeners.{name}.addresses: {problem}"
                 for name, problem in server.listener_conflicts()]
    if conflicts:
        raise ConfigError(conflicts)

    tables: dict[str, PluginTable] = {}
    for i, name in enumerate(plugin_order):
        table = merged["plugins"][name]
        srcs = sorted({p for loc, p in origins.items() if loc[:2] == ("plugins", name)})
        tables[name] = PluginTable(name=name, values=dict(table), order=i, files=srcs)
    return Config(config_dir=cdir, server=server, plugins=tables, files=files, origins=origins)
