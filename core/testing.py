"""Test kit for tampu and for plugin authors (the ``tampu`` pytest11 plugin).

Fixtures:

* ``tampu_server`` — a factory: ``srv = tampu_server(conf={"30-x.toml": "..."}, plugins=[obj],
  users={"user@example.test": "secret"})`` starts a real server on loopback (ephemeral ports,
  a trustme certificate for ``localhost``) in a background thread and returns a ``RunningServer``
  with ``.port(kind)``, ``.smtp(kind)`` (a connected ``smtplib.SMTP``), ``.client_tls()``,
  ``.queue_items()`` and ``.stop()``. Servers stop at the end of the test.
* ``tampu_ca`` — the trustme CA the servers' certificates are issued by.

Everything heavy is imported lazily, so having tampu installed costs pytest nothing.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import ssl
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from tampu.server import Server

LOCAL_DOMAIN = "example.test"


def server_toml(*, hostname: str = "localhost", domains: tuple[str, ...] = (LOCAL_DOMAIN,),
                extra: str = "", plugins: tuple[str, ...] = ("auth", "localusers", "relay",
                                                             "loopdetect")) -> str:
    """A conf.d file for tests: three listeners on 127.0.0.1 ephemeral ports."""
    listeners = "".join(
        f'\n[server.listeners.{kind}]\nkind = "{kind}"\naddresses = ["127.0.0.1:0"]\n'
        for kind in ("smtp", "submission", "submissions")
    )
    enabled = "".join(f"\n[plugins.{p}]\nenabled = true\n" for p in plugins)
    return textwrap.dedent(f"""\
        [server]
        hostname = "{hostname}"
        local_domains = {json.dumps(list(domains))}
        command_timeout = 30
        max_errors = 50
        plugin_timeout = 5
        shutdown_timeout = 2
        retry_schedule = [1.0]
        file_check_interval = 0
        {extra}
        """) + listeners + enabled


_DEFAULT_CA: list[Any] = []


def default_ca() -> Any:  # noqa: ANN401 - a trustme.CA
    """The CA of the test kit's certificates when a test does not bring its own."""
    if not _DEFAULT_CA:
        import trustme

        _DEFAULT_CA.append(trustme.CA())
    return _DEFAULT_CA[0]


def context_for(config: Any) -> Any:  # noqa: ANN401 - a Config and a ServerContext
    """A ServerContext of ``config`` (store and DNS client included), to build a plugin in a
    unit test: ``MyPlugin(PluginContext("name", settings, context_for(config)))``."""
    from tampu.context import ServerContext
    from tampu.dns import Resolver
    from tampu.store_files import FilesystemStore

    return ServerContext(config, FilesystemStore(config.data_dir / "queue",
                                                 config.server.max_queue_items),
                         Resolver.from_settings(config.server.dns_servers,
                                                config.server.dns_timeout))


def runtime_for(config: Any) -> Any:  # noqa: ANN401 - a Config and a Runtime
    """The validated runtime of ``config`` (what ``tampu check`` builds), for tests."""
    from tampu.runtime import build_runtime
    from tampu.store_files import FilesystemStore

    return build_runtime(config, FilesystemStore(config.data_dir / "queue",
                                                 config.server.max_queue_items))


def make_config_dir(root: Path, *, conf: dict[str, str] | None = None,
                    users: dict[str, str] | None = None, ca: Any = None,
                    base: str | None = None) -> Path:
    """Write a configuration directory: conf.d, domains/<d>/users, certs/localhost (issued
    by ``ca``, or by the kit's own CA)."""
    ca = ca if ca is not None else default_ca()
    from tampu.users import UserRecord, hash_password, write_users_file

    root.mkdir(parents=True, exist_ok=True)
    confd = root / "conf.d"
    confd.mkdir(exist_ok=True)
    (confd / "00-test.toml").write_text(base if base is not None else server_toml())
    for name, text in (conf or {}).items():
        (confd / name).write_text(textwrap.dedent(text))
    (root / "domains" / LOCAL_DOMAIN).mkdir(parents=True, exist_ok=True)
    by_domain: dict[str, dict[str, UserRecord]] = {}
    for address, password in (users or {}).items():
        user, _, domain = address.rpartition("@")
        by_domain.setdefault(domain, {})[user] = UserRecord(user, hash_password(password,
                                                                                 log_n=10))
    for domain, entries in by_domain.items():
        write_users_file(root / "domains" / domain / "users", entries, "tampu")
    if not (root / "certs" / "localhost").exists():
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
        certdir = root / "certs" / "localhost"
        certdir.mkdir(parents=True, exist_ok=True)
        cert.private_key_pem.write_to_path(str(certdir / "privkey.pem"))
        cert.cert_chain_pems[0].write_to_path(str(certdir / "fullchain.pem"))
        for extra in cert.cert_chain_pems[1:]:
            with open(certdir / "fullchain.pem", "ab") as fh:
                fh.write(extra.bytes())
    return root


@dataclass
class RunningServer:
    """A tampu server running in a background thread with its own event loop."""

    config_dir: Path
    server: Server
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    ca: Any = None
    _stopped: bool = field(default=False)

    def port(self, listener: str = "smtp") -> int:
        return int(self.server.bound[listener][0][1])

    def client_tls(self) -> ssl.SSLContext:
        """A client context that trusts the test CA (hostname ``localhost``)."""
        ctx = ssl.create_default_context()
        if self.ca is not None:
            self.ca.configure_trust(ctx)
        return ctx

    def smtp(self, listener: str = "smtp", *, timeout: float = 10) -> smtplib.SMTP:
        if self.server.config.server.listeners[listener].kind == "submissions":
            return smtplib.SMTP_SSL("localhost", self.port(listener), timeout=timeout,
                                    context=self.client_tls())
        return smtplib.SMTP("127.0.0.1", self.port(listener), timeout=timeout,
                            local_hostname="client.test")

    @property
    def store(self) -> Any:  # noqa: ANN401 - the server's QueueStore (FilesystemStore here)
        return self.server.runtime.store

    @property
    def queue_dir(self) -> Path:
        return self.config_dir_data / "queue"

    @property
    def config_dir_data(self) -> Path:
        return self.server.config.data_dir

    def queue_items(self) -> list[str]:
        """IDs of the items in the queue (read from the queue directory)."""
        from tampu.store_files import FilesystemStore

        return FilesystemStore(self.queue_dir, 1).ids_now()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(30)


class ServerFactory(Protocol):
    def __call__(self, *, conf: dict[str, str] | None = ..., plugins: list[Any] | None = ...,
                 users: dict[str, str] | None = ..., deliver: bool = ...,
                 base: str | None = ..., config_dir: Path | None = ...) -> RunningServer: ...


def start_server(config_dir: Path, *, plugins: list[Any] | None = None, deliver: bool = False,
                 ca: Any = None) -> RunningServer:
    from tampu.config import load_config
    from tampu.server import Server

    config = load_config(config_dir)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        box["loop"] = loop

        async def main() -> None:
            try:
                server = Server(config, plugins or [], deliver=deliver)
                box["server"] = server
                started = asyncio.Event()
                task = asyncio.ensure_future(server.serve(install_signals=False, ready=started))
                waiter = asyncio.ensure_future(started.wait())
                await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()  # not left pending when start-up failed
                if task.done():
                    task.result()
                ready.set()
                await task
            except BaseException as exc:
                box["error"] = exc
                ready.set()

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, name="tampu-test-server", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in box:
        raise box["error"]
    return RunningServer(config_dir=config_dir, server=box["server"], loop=box["loop"],
                         thread=thread, ca=ca)


@pytest.fixture(scope="session")
def tampu_ca() -> Any:
    import trustme

    return trustme.CA()


@pytest.fixture
def tampu_server(tmp_path: Path, tampu_ca: Any) -> Iterator[Callable[..., RunningServer]]:
    running: list[RunningServer] = []

    def factory(*, conf: dict[str, str] | None = None, plugins: list[Any] | None = None,
                users: dict[str, str] | None = None, deliver: bool = False,
                base: str | None = None, config_dir: Path | None = None) -> RunningServer:
        cdir = config_dir or make_config_dir(tmp_path / f"tampu{len(running)}", conf=conf,
                                             users=users, ca=tampu_ca, base=base)
        srv = start_server(cdir, plugins=plugins, deliver=deliver, ca=tampu_ca)
        running.append(srv)
        return srv

    yield factory
    for srv in running:
        srv.stop()
