"""The server: listeners, TLS, start-up, reload and graceful shutdown (after uvicorn's)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tampu.caller import Hooks
from tampu.config import DEFAULT_PORTS, Config, ListenerSettings, load_config, split_hostport
from tampu.context import ServerContext
from tampu.envelope import ListenerInfo
from tampu.errors import ConfigError
from tampu.queue import Queue
from tampu.registry import Registry, build_registry
from tampu.tls import load_certificates, make_self_signed, server_context

if TYPE_CHECKING:
    from tampu.delivery import DeliveryRunner
    from tampu.smtp import TampuSMTP

log = logging.getLogger("tampu.server")


@dataclass(eq=False)
class ServerState:
    """What every connection shares: hooks, open connections and background tasks."""

    context: ServerContext
    hooks: Hooks
    connections: set[TampuSMTP] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    stopping: bool = False

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background; shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def listener_addresses(name: str, kind: str, addresses: list[str]) -> list[tuple[str, int]]:
    if not addresses:
        return [("", DEFAULT_PORTS[kind])]
    return [split_hostport(a) for a in addresses]


class Server:
    """A tampu server for one configuration. ``await server.serve()`` runs it until stopped."""

    def __init__(self, config: Config, extra_plugins: Iterable[Any] = (),
                 *, deliver: bool = True) -> None:
        self.config = config
        self.extra_plugins = list(extra_plugins)
        self.context = ServerContext(config)
        self.registry: Registry = build_registry(config, self.context, self.extra_plugins)
        self.context.hooks = self.registry.hooks
        self.state = ServerState(self.context, self.registry.hooks)
        self.queue = Queue(config.data_dir / "queue", self.registry.hooks,
                           config.server.max_queue_items)
        self.context.queue = self.queue
        self.deliver = deliver
        self.runner: DeliveryRunner | None = None
        self.listeners: list[asyncio.Server] = []
        self.bound: dict[str, list[tuple[str, int]]] = {}
        self.tls: ssl.SSLContext | None = None
        self._stop = asyncio.Event()
        self._sockets: dict[str, list[socket.socket]] = {}
        self.on_stop: list[Callable[[], None]] = []
        """Called when a stop is requested (the worker manager passes it on)."""
        self.on_reload: list[Callable[[], None]] = []

    @classmethod
    def from_config_dir(cls, config_dir: str, **kw: Any) -> Server:
        return cls(load_config(config_dir), **kw)

    # ------------------------------------------------------------------ start

    def load_tls(self, config: Config | None = None) -> ssl.SSLContext | None:
        config = config or self.config
        certs = load_certificates(config.certs_dir)
        if not certs and config.server.self_signed_cert:
            selfdir = config.data_dir / "selfsigned"
            if not (selfdir / config.server.hostname / "fullchain.pem").exists():
                make_self_signed(selfdir, config.server.hostname)
            certs = load_certificates(selfdir)
        return server_context(certs, config.server.hostname)

    def bind(self, *, reuse_port: bool = False) -> None:
        """Open the listening sockets (before start-up hooks). ``reuse_port``: SO_REUSEPORT,
        so that worker processes can bind the same addresses."""
        self._sockets = bind_listeners(self.config, reuse_port=reuse_port)
        self.bound = {name: [s.getsockname()[:2] for s in socks]
                      for name, socks in self._sockets.items()}

    async def start(self) -> None:
        # Blocking work (fsync, pyspf, Maildir writes, password hashing) runs in threads; the
        # default pool (cores + 4) makes concurrent sessions queue behind each other's fsyncs.
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="tampu"))
        self.data_dirs()
        self.tls = self.load_tls()
        for name, lst in self.config.server.listeners.items():
            if lst.kind == "submissions" and self.tls is None:
                raise ConfigError([f"listener {name}: kind submissions needs a certificate in "
                                   f"{self.config.certs_dir}/<name>/ (or self_signed_cert = "
                                   "true)"])
            if lst.kind == "submission" and self.tls is None:
                log.warning("listener %s: no certificate in %s/<name>/, so no STARTTLS: nobody "
                            "can authenticate, and submission requires it", name,
                            self.config.certs_dir)
        if problems := proxy_problems(self.config):
            raise ConfigError(problems)
        if not self._sockets:
            self.bind()
        try:
            await self.state.hooks.tampu_startup(self.context)
        except BaseException:  # tampu does not serve: give the addresses back
            for sock in [s for socks in self._sockets.values() for s in socks]:
                sock.close()
            raise
        if self.deliver:
            from tampu.delivery import DeliveryRunner

            self.runner = DeliveryRunner(self.context, self.queue, self.state)
            await self.runner.start()
        await self._listen()
        log.info("tampu ready: %s", ", ".join(
            f"{n}={'/'.join(f'{h}:{p}' for h, p in a)}" for n, a in self.bound.items()))

    def data_dirs(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)

    async def _listen(self) -> None:
        from tampu.smtp import TampuSMTP

        loop = asyncio.get_running_loop()
        for name, lst in self.config.server.listeners.items():
            info = ListenerInfo(name=name, kind=lst.kind,
                                address=",".join(f"{h}:{p}" for h, p in self.bound[name]))
            implicit = lst.kind == "submissions"

            def factory(info: ListenerInfo = info, implicit: bool = implicit,
                        lst: ListenerSettings = lst) -> TampuSMTP:
                # Read at each connection: a reload changes certificates and PROXY settings.
                now = self.config.server.listeners.get(info.name, lst)
                trusted = ([ipaddress.ip_network(n, strict=False) for n in now.proxy_trusted]
                           if now.proxy_protocol else None)
                return TampuSMTP(self.state, info, None if implicit else self.tls, trusted)

            for sock in self._sockets[name]:
                srv = await loop.create_server(
                    factory, sock=sock, ssl=self.tls if implicit else None,
                    ssl_handshake_timeout=30 if implicit else None,
                )
                self.listeners.append(srv)

    # ------------------------------------------------------------------ run / stop

    def request_stop(self) -> None:
        if not self._stop.is_set():
            for callback in self.on_stop:
                callback()
        self._stop.set()

    async def serve(self, *, install_signals: bool = True,
                    ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        await self.start()
        restore = []
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                restore.append(sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: self.state.spawn(self.reload()))
            loop.add_signal_handler(signal.SIGUSR1, self.retry_requests)
            restore.extend([signal.SIGHUP, signal.SIGUSR1])
        if ready is not None:
            ready.set()
        try:
            await self._stop.wait()
        finally:
            for sig in restore:
                loop.remove_signal_handler(sig)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting; 421 to idle sessions; let transactions finish; cancel the rest."""
        self.state.stopping = True
        for srv in self.listeners:
            srv.close()
        for conn in list(self.state.connections):
            if conn.idle:
                await conn.close_for_shutdown()
        deadline = self.config.server.shutdown_timeout
        step = 0.05
        waited = 0.0
        while self.state.connections and waited < deadline:
            for conn in list(self.state.connections):
                if conn.idle:
                    await conn.close_for_shutdown()
            await asyncio.sleep(step)
            waited += step
        for conn in list(self.state.connections):
            log.warning("closing session %s still in a transaction at shutdown",
                        conn.tsession.id if conn.tsession else "?")
            conn._close()
        if self.runner is not None:
            await self.runner.stop()
        for srv in self.listeners:
            await srv.wait_closed()
        if self.state.tasks:
            await asyncio.wait(list(self.state.tasks), timeout=5)
        await self.state.hooks.tampu_shutdown(self.context)
        log.info("tampu stopped")

    def retry_requests(self) -> None:
        """SIGUSR1 from ``tampu queue retry|delete``: pick up requests in queue/retry/."""
        if self.runner is not None:
            self.runner.handle_requests()

    # ------------------------------------------------------------------ reload

    async def reload(self) -> bool:
        """Re-read conf.d, plugins and certificates; keep the old ones if anything is wrong."""
        try:
            config = load_config(self.config.config_dir)
            if problems := proxy_problems(config):
                raise ConfigError(problems)
            # The server-wide stash survives reloads: plugins hand state over through it.
            context = ServerContext(config, queue=self.queue, stash=self.context.stash)
            registry = build_registry(config, context, self.extra_plugins)
            context.hooks = registry.hooks
            tls = self.load_tls(config)
        except (ConfigError, OSError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            for problem in problems:
                log.error("reload refused, keeping the running configuration: %s", problem)
            return False
        if config.server.listeners != self.config.server.listeners:
            log.warning("reload: listener addresses and kinds change at the next restart "
                        "(PROXY settings apply to new connections now)")
        self.config, self.context, self.registry = config, context, registry
        self.state.context = context
        self.state.hooks = registry.hooks
        self.queue.hooks = registry.hooks
        if self.tls is not None and tls is not None:
            self.tls.sni_callback = _delegate_sni(tls)  # the listening context stays; new
        elif tls is not None:                            # handshakes use the fresh certificates
            self.tls = tls
        if self.runner is not None:
            self.runner.reconfigure(context)
        for callback in self.on_reload:
            callback()
        await registry.hooks.tampu_reload(context)
        log.info("configuration reloaded from %s", config.config_dir)
        return True


def proxy_problems(config: Config) -> list[str]:
    """PROXY comes before TLS, and an implicit-TLS listener starts with the handshake."""
    return [f"listener {name}: proxy_protocol is not supported on kind submissions "
            "(implicit TLS); use a submission listener or let the proxy pass TLS through to "
            "a listener without PROXY" for name, lst in config.server.listeners.items()
            if lst.proxy_protocol and lst.kind == "submissions"]


def _delegate_sni(fresh: ssl.SSLContext) -> Any:
    """An SNI callback for the listening context that switches every new handshake to
    ``fresh`` (the reloaded default certificate), then lets ``fresh``'s own SNI choice run."""
    choose = fresh.sni_callback

    def pick(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = fresh
        if choose is not None:
            choose(sslobj, name, fresh)  # type: ignore[arg-type]

    return pick


def bind_listeners(config: Config, *, reuse_port: bool = False
                   ) -> dict[str, list[socket.socket]]:
    """Listening sockets for every listener of ``config``; ConfigError naming the listener."""
    out: dict[str, list[socket.socket]] = {}
    for name, lst in config.server.listeners.items():
        socks: list[socket.socket] = []
        for host, port in listener_addresses(name, lst.kind, lst.addresses):
            try:
                socks.extend(_bind(host, port, reuse_port))
            except OSError as exc:
                for sock in [s for done in out.values() for s in done] + socks:
                    sock.close()
                raise ConfigError([f"listener {name}: cannot listen on {host or '*'}:{port}: "
                                   f"{exc.strerror}"]) from exc
        out[name] = socks
    return out


def _bind(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks = []
    seen = set()
    for family, stype, proto, _, addr in infos:
        if (family, addr) in seen:
            continue
        seen.add((family, addr))
        sock = socket.socket(family, stype, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
        socks.append(sock)
        if port == 0:
            break  # an ephemeral port cannot be shared between families
    return socks
