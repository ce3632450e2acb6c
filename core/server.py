"""The server: listeners, start-up, reload and graceful shutdown (after uvicorn's).

A Server holds one :class:`tampu.state.ServerState`, whose ``runtime`` is the running
configuration (context, plugins, hooks, certificates). A reload builds and validates a new
Runtime first and swaps that one reference; sessions and deliveries read it at each step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import logging
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from tampu.claims import ClaimLoop, start_claims
from tampu.config import Config, load_config
from tampu.decisions import JOURNAL_DIR, Journal
from tampu.delivery import DeliveryRunner
from tampu.envelope import ListenerInfo
from tampu.errors import ConfigError
from tampu.files import unix_socket_path
from tampu.intake import Intake
from tampu.item import QueueItem
from tampu.registry import Registry
from tampu.runtime import Runtime, build_runtime, ensure_certificates
from tampu.smtp import SmtpSession
from tampu.smtp_memory import MemoryBudget, tune_malloc
from tampu.state import ServerState
from tampu.stores import make_stores
from tampu.tls import is_handshake_noise

log = logging.getLogger("tampu.server")

RELOAD_RESULT = "reload.result"


class Server:
    """A tampu server for one configuration. ``await server.serve()`` runs it until stopped.

    Raises ConfigError (every problem of the configuration) when it cannot be built.
    """

    def __init__(self, config: Config, extra_plugins: Iterable[Any] = (),
                 *, deliver: bool = True, resume: bool = True) -> None:
        self.extra_plugins = list(extra_plugins)
        ensure_certificates(config)
        self.stores = make_stores(config)  # [server] queue_store / state_store
        self.journal = Journal(config.data_dir / JOURNAL_DIR, config.server.journal_max_size,
                               config.server.journal_max_age, config.node)
        self.state = ServerState(build_runtime(config, self.stores.queue,
                                               extra_plugins=self.extra_plugins,
                                               journal=self.journal, state=self.stores.state))
        self.intake = Intake(self.state)
        self.deliver = deliver
        self.resume = resume
        """Resume the queue at start (False in a reception worker: the main process does)."""
        self.hand_over: Callable[[QueueItem], bool] | None = None
        self.owned_elsewhere: Callable[[str], bool] | None = None
        """For the delivery runner (set by the worker manager, :mod:`tampu.workers`)."""
        self.runner: DeliveryRunner | None = None
        self.claims: ClaimLoop | None = None
        self.listeners: list[asyncio.Server] = []
        self.bound: dict[str, list[tuple[str, int]]] = {}
        self._stop = asyncio.Event()
        self._sockets: dict[str, list[socket.socket]] = {}
        self._local: socket.socket | None = None
        """The local socket of ``tampu sendmail`` ([server] local_socket), main process only."""
        self._implicit_tls: ssl.SSLContext | None = None
        """The listening context of implicit-TLS listeners; a reload points its SNI choice
        at the new certificates (STARTTLS takes the running ones at each handshake)."""
        self.on_stop: list[Callable[[], None]] = []
        """Called when a stop is requested (the worker manager passes it on)."""
        self.on_reload: list[Callable[[], None]] = []
        self.on_shutdown: list[Callable[[], None]] = []
        self.budget = MemoryBudget()
        """Message bodies held by this process's sessions ([server] reception_memory)."""

    @property
    def runtime(self) -> Runtime:
        return self.state.runtime

    @property
    def config(self) -> Config:
        return self.state.runtime.config

    @property
    def registry(self) -> Registry:
        return self.state.runtime.registry

    # ------------------------------------------------------------------ start

    def bind(self, *, reuse_port: bool = False, listen: bool = True,
             local_socket: bool = True) -> None:
        """Open the listening sockets (before start-up hooks). ``reuse_port``: SO_REUSEPORT,
        so that worker processes can bind the same addresses; ``listen=False``: bound only,
        so that no connection waits for this process before it serves (listen() comes when
        it starts serving); ``local_socket=False``: not the local socket (a reception worker:
        the main process serves it)."""
        self._sockets = bind_listeners(self.config, reuse_port=reuse_port, listen=listen)
        self.bound = {name: [s.getsockname()[:2] for s in socks]
                      for name, socks in self._sockets.items()}
        if local_socket:
            try:
                self._local = bind_local_socket(self.config, listen)
            except ConfigError:
                self._close_sockets()
                raise

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    async def start(self, *, gate: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """Start-up hooks, then (when ``gate`` lets it, and no stop was requested meanwhile)
        delivery and the listeners. False: stopped before serving (the hooks that started
        are shut down, the addresses given back). Raises what a start-up hook raises."""
        loop = asyncio.get_running_loop()
        tune_malloc()
        # Blocking work (fsync, Maildir writes, password hashing) runs in threads; the
        # default pool (cores + 4) makes concurrent sessions queue behind each other's fsyncs.
        loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="tampu"))
        quiet_handshake_errors(loop)
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        for name, lst in self.config.server.listeners.items():
            if lst.kind == "submission" and self.runtime.tls is None:
                log.warning("listener %s: no certificate in %s/<name>/, so no STARTTLS: nobody "
                            "can authenticate, and submission requires it", name,
                            self.config.certs_dir)
        if not self._sockets:
            self.bind()
        if self._stop.is_set():  # stopped before start-up
            self._close_sockets()
            return False
        try:
            await self.stores.open()  # the queue and state stores connect (PostgreSQL)
            await self.runtime.hooks.tampu_startup(self.runtime.context)
        except BaseException:  # tampu does not serve: give the addresses back
            self._close_sockets()
            await self.stores.close()
            raise
        if not await self._may_serve(gate):
            self._close_sockets()
            await self.runtime.hooks.tampu_shutdown(self.runtime.context)
            self.runtime.context.dns.close()
            await self.stores.close()
            log.info("tampu stopped before serving")
            return False
        if self.deliver:
            self.runner = DeliveryRunner(self.state, self.intake, resume=self.resume,
                                         hand_over=self.hand_over,
                                         owned_elsewhere=self.owned_elsewhere)
            await self.runner.start()
            self.claims = start_claims(self.state, self.runner, self.intake)  # shared queue
        await self._listen()
        log.info("tampu ready: %s", ", ".join(
            f"{n}={'/'.join(f'{h}:{p}' for h, p in a)}" for n, a in self.bound.items()))
        return True

    async def _may_serve(self, gate: Callable[[], Awaitable[bool]] | None) -> bool:
        """Whether to go on to serving: no stop requested, and the gate (the other
        processes' start-up) says yes before any stop is."""
        if self._stop.is_set():
            return False
        if gate is None:
            return True
        passed = asyncio.ensure_future(gate())
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([passed, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not passed.done():
            passed.cancel()
            return False
        return passed.result() and not self._stop.is_set()

    def _close_sockets(self) -> None:
        for sock in [s for socks in self._sockets.values() for s in socks]:
            sock.close()
        if self._local is not None:
            remove_local_socket(self._local, self.config)
            self._local = None

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for name, lst in self.config.server.listeners.items():
            info = ListenerInfo(name=name, kind=lst.kind,
                                address=",".join(f"{h}:{p}" for h, p in self.bound[name]))

            def factory(info: ListenerInfo = info) -> SmtpSession:
                # Read at each connection: a reload changes certificates and PROXY settings.
                runtime = self.state.runtime
                now = runtime.config.server.listeners.get(info.name)
                trusted = ([ipaddress.ip_network(n, strict=False) for n in now.proxy_trusted]
                           if now is not None and now.proxy_protocol else None)
                return SmtpSession(self.state, self.intake, info, runtime.tls, trusted,
                                   self.budget)

            implicit = None
            if lst.kind == "submissions":
                implicit = self._implicit_tls = self._implicit_tls or self.runtime.tls
            for sock in self._sockets[name]:
                sock.listen(1024)  # again is harmless; first time when bound with listen=False
                # The handshake of an implicit-TLS listener happens before the session
                # exists: a client that fails or stalls in it never takes a session slot.
                self.listeners.append(await loop.create_server(
                    factory, sock=sock, ssl=implicit,
                    ssl_handshake_timeout=self.config.server.tls_handshake_timeout
                    if implicit is not None else None))
        if self._local is not None:
            where = str(self.config.data_dir / self.config.server.local_socket)
            local = ListenerInfo(name="local", kind="local", address=where)
            self._local.listen(128)
            self.listeners.append(await loop.create_unix_server(
                lambda: SmtpSession(self.state, self.intake, local, None, None, self.budget),
                sock=self._local))
            log.info("local submissions (tampu sendmail) on %s", where)

    # ------------------------------------------------------------------ run / stop

    def request_stop(self) -> None:
        if not self._stop.is_set():
            for callback in self.on_stop:
                callback()
        self._stop.set()

    async def serve(self, *, install_signals: bool = True, ready: asyncio.Event | None = None,
                    gate: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """Start, serve until stopped, shut down. ``gate``: awaited after the start-up hooks,
        before serving (the other processes' start-up); False, or a stop requested before
        serving, ends the server there. Returns whether it served."""
        loop = asyncio.get_running_loop()
        restore: list[signal.Signals] = []
        if install_signals:  # before start-up: a SIGTERM then is a stop before serving
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                restore.append(sig)
        started = False
        try:
            started = await self.start(gate=gate)
        finally:
            if not started:
                for sig in restore:
                    loop.remove_signal_handler(sig)
                for callback in self.on_shutdown:
                    callback()
        if not started:
            return False
        if install_signals:
            loop.add_signal_handler(signal.SIGHUP, lambda: self.state.spawn(self.reload()))
            loop.add_signal_handler(signal.SIGUSR1, self.handle_requests)
            restore.extend([signal.SIGHUP, signal.SIGUSR1])
        if ready is not None:
            ready.set()
        try:
            await self._stop.wait()
        finally:
            for sig in restore:
                loop.remove_signal_handler(sig)
            await self.shutdown()
        return True

    async def shutdown(self) -> None:
        """Stop accepting; 421 to idle sessions; let transactions finish; cancel the rest."""
        self.state.stopping = True
        for srv in self.listeners:
            srv.close()
        deadline = time.monotonic() + self.config.server.shutdown_timeout
        while self.state.connections and time.monotonic() < deadline:
            for conn in list(self.state.connections):
                if conn.idle:
                    conn.close_for_shutdown()
            await asyncio.sleep(0.05)
        for conn in list(self.state.connections):
            log.warning("closing a session still in a transaction at shutdown")
            conn.abort()
        if self.claims is not None:
            await self.claims.stop()
        if self.runner is not None:
            await self.runner.stop()
        for srv in self.listeners:
            await srv.wait_closed()
        if self._local is not None:
            remove_local_socket(self._local, self.config)
            self._local = None
        if self.state.tasks:
            await asyncio.wait(list(self.state.tasks), timeout=5)
        await self.runtime.hooks.tampu_shutdown(self.runtime.context)
        self.runtime.context.dns.close()
        close_store = getattr(self.runtime.store, "close", None)
        if close_store is not None:  # the filesystem store retires its log segments
            try:
                await close_store()
            except OSError as exc:
                log.error("closing the queue: %s", exc)
        await asyncio.to_thread(self.journal.close)
        await self.stores.close()
        for callback in self.on_shutdown:
            callback()
        log.info("tampu stopped")

    def handle_requests(self) -> None:
        """SIGUSR1 from ``tampu queue``: pick up the requests the store holds."""
        if self.runner is not None:
            self.state.spawn(self.runner.handle_requests())

    # ------------------------------------------------------------------ reload

    async def reload(self) -> bool:
        """Re-read conf.d, plugins and certificates; keep the old ones if anything is wrong.
        The outcome is also written to ``<data_dir>/reload.result`` for ``tampu reload``."""
        old = self.state.runtime
        try:
            config = load_config(old.config.config_dir)
            same_dns = (config.server.dns_servers, config.server.dns_timeout) == \
                (old.config.server.dns_servers, old.config.server.dns_timeout)
            self.journal.max_bytes = config.server.journal_max_size
            self.journal.max_age = config.server.journal_max_age
            runtime = await asyncio.to_thread(
                build_runtime, config, old.store, stash=old.context.stash,
                dns=old.context.dns if same_dns else None, extra_plugins=self.extra_plugins,
                journal=self.journal, state=old.context.state)
        except (ConfigError, OSError) as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            for problem in problems:
                log.error("reload refused, keeping the running configuration: %s", problem)
            self._reload_result(False, problems)
            return False
        if (config.server.queue_store, config.server.state_store) != \
                (old.config.server.queue_store, old.config.server.state_store):
            log.warning("reload: queue_store and state_store change at the next restart")
        if config.server.listeners != old.config.server.listeners:
            log.warning("reload: listener addresses and kinds change at the next restart "
                        "(PROXY settings apply to new connections now)")
        self.state.runtime = runtime
        if self._implicit_tls is not None and runtime.tls is not None:
            self._implicit_tls.sni_callback = _delegate_sni(runtime.tls)
        if runtime.context.dns is not old.context.dns:  # lookups in flight finish first
            asyncio.get_running_loop().call_later(60, old.context.dns.close)
        for callback in self.on_reload:
            callback()
        await runtime.hooks.tampu_reload(runtime.context)
        log.info("configuration reloaded from %s", config.config_dir)
        self._reload_result(True, [])
        return True

    def _reload_result(self, ok: bool, problems: list[str]) -> None:
        path = self.config.data_dir / RELOAD_RESULT
        try:
            path.write_text(json.dumps({"time": time.time(), "ok": ok, "problems": problems}))
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc.strerror)


def _delegate_sni(fresh: ssl.SSLContext) -> Any:  # noqa: ANN401 - ssl's callback type
    """An SNI callback for the listening context that switches every new handshake to
    ``fresh`` (the reloaded default certificate), then lets ``fresh``'s own SNI choice run."""
    choose = fresh.sni_callback

    def pick(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = fresh
        if choose is not None:
            choose(sslobj, name, fresh)  # type: ignore[arg-type]

    return pick


def quiet_handshake_errors(loop: asyncio.AbstractEventLoop) -> None:
    """A client that aborts a TLS handshake is its problem: one INFO line, no traceback."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if is_handshake_noise(context.get("exception")):
            log.info("TLS: %s", context.get("message", "connection error"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def bind_listeners(config: Config, *, reuse_port: bool = False, listen: bool = True
                   ) -> dict[str, list[socket.socket]]:
    """Listening sockets for every listener of ``config`` (bound only with ``listen=False``);
    ConfigError naming the listener."""
    out: dict[str, list[socket.socket]] = {}
    for name, lst in config.server.listeners.items():
        socks: list[socket.socket] = []
        for host, port in lst.endpoints():
            try:
                socks.extend(_bind(host, port, reuse_port, listen))
            except OSError as exc:
                for sock in [s for done in out.values() for s in done] + socks:
                    sock.close()
                raise ConfigError([f"listener {name}: cannot listen on {host or '*'}:{port}: "
                                   f"{exc.strerror or exc}"]) from exc
        out[name] = socks
    return out


def _bind(host: str, port: int, reuse_port: bool = False,
          listen: bool = True) -> list[socket.socket]:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    for family, stype, proto, _, addr in infos:
        if (family, addr) in seen:
            continue
        seen.add((family, addr))
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            if listen:
                sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            for done in socks:
                done.close()
            raise
        socks.append(sock)
        if port == 0:
            break  # an ephemeral port cannot be shared between families
    return socks


def bind_local_socket(config: Config, listen: bool = True) -> socket.socket | None:
    """The UNIX socket of ``tampu sendmail`` (``[server] local_socket`` in the data
    directory; None when that is empty), open to every local user (0666, as Postfix lets
    every user submit). A socket file left by a crash is replaced; one a running server
    answers on is a ConfigError."""
    name = config.server.local_socket
    if not name:
        return None
    path = config.data_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with unix_socket_path(path) as name_now:
                probe.connect(name_now)
        except OSError:
            path.unlink(missing_ok=True)  # nobody answers: left by a crash
        else:
            raise ConfigError([f"server.local_socket: {path} is in use by a running server"])
        finally:
            probe.close()
    elif path.exists():
        raise ConfigError([f"server.local_socket: {path} exists and is not a socket"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with unix_socket_path(path) as name_now:
            sock.bind(name_now)
        path.chmod(0o666)
        if listen:
            sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError([f"server.local_socket: cannot listen on {path}: "
                           f"{exc.strerror or exc}"]) from exc
    return sock


def remove_local_socket(sock: socket.socket, config: Config) -> None:
    sock.close()
    if config.server.local_socket:
        (config.data_dir / config.server.local_socket).unlink(missing_ok=True)
