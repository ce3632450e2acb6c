"""tampu's test kit, for tampu and for plugin authors: the ``tampu`` pytest plugin.

``pip install 'tampu[testing]'`` installs it with what it needs (pytest, trustme, hypothesis);
pytest loads it through the ``pytest11`` entry point. Fixtures:

* ``tampu_server`` — a factory: ``srv = tampu_server(conf={"30-x.toml": "..."},
  plugins=[MyPlugin], users={"user@example.test": "secret"}, dns=dns_server, record=True,
  capture=True)`` starts a real server on loopback (ephemeral ports, a certificate for
  ``localhost`` from ``tampu_ca``) in a thread and returns a ``RunningServer``: ``.send()``
  (one SMTP transaction, every stage's reply), ``.smtp(listener)`` (a connected
  ``smtplib.SMTP``), ``.client_tls()``, ``.port()``, ``.queue_items()``, ``.store``,
  ``.verdicts`` (a ``VerdictRecorder``), ``.capture`` (a ``CaptureBackend``), ``.journal()``.
  Servers stop at the end of the test.
* ``tampu_ca`` — the trustme CA of the servers' certificates (session-wide).
* ``dns_server`` — a running ``DNSServer`` on 127.0.0.1 (empty zone; zone helpers ``spf``,
  ``mx``, ``a``, ``dkim``, ``dmarc``, ``mta_sts``, ``tlsa``, ``txt``).
* ``make_dns`` — a factory: ``make_dns(zone, timeout={...}, authenticated=..., ttl=...)``.
* ``fake_mx`` — a factory of running ``FakeMX`` servers (a remote SMTP server that records
  and answers as told): ``fake_mx()``, ``fake_mx(tls=True, names=("mx.remote.test",))``.

Helpers (import from ``tampu.testing``): ``server_toml``, ``make_config_dir``, ``launch``,
``start_server``, ``runtime_for``, ``context_for``, ``default_ca``, ``send``, ``wait_for``;
``DNSServer``, ``Zone``, ``make_dkim_key``, ``txt_rdata``, ``tlsa_rdata``; ``VerdictRecorder``;
``CaptureBackend``; ``FakeMX``, ``MXHandler``, ``MXFarm``, ``free_port``, ``server_tls``,
``write_ca``.

Only this module and ``server`` are imported when pytest starts; the rest (dnspython,
aiosmtpd, cryptography) when a test first uses them, so having tampu installed costs pytest
nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tampu.testing.server import (
    LOCAL_DOMAIN,
    RunningServer,
    ServerFactory,
    SmtpResult,
    context_for,
    default_ca,
    launch,
    make_config_dir,
    runtime_for,
    send,
    server_toml,
    start_server,
)

if TYPE_CHECKING:
    from tampu.testing.capture import CaptureBackend as CaptureBackend
    from tampu.testing.capture import Delivery as Delivery
    from tampu.testing.dns import DkimKeyPair as DkimKeyPair
    from tampu.testing.dns import DNSServer as DNSServer
    from tampu.testing.dns import Zone as Zone
    from tampu.testing.dns import make_dkim_key as make_dkim_key
    from tampu.testing.dns import tlsa_rdata as tlsa_rdata
    from tampu.testing.dns import txt_rdata as txt_rdata
    from tampu.testing.mx import FakeMX as FakeMX
    from tampu.testing.mx import MXFarm as MXFarm
    from tampu.testing.mx import MXHandler as MXHandler
    from tampu.testing.mx import Received as Received
    from tampu.testing.mx import fixed_port as fixed_port
    from tampu.testing.mx import free_port as free_port
    from tampu.testing.mx import server_tls as server_tls
    from tampu.testing.mx import write_ca as write_ca
    from tampu.testing.recorder import HookCall as HookCall
    from tampu.testing.recorder import RecordedVerdict as RecordedVerdict
    from tampu.testing.recorder import VerdictRecorder as VerdictRecorder
    from tampu.testing.recorder import wait_for as wait_for

_LAZY = {
    "CaptureBackend": "capture", "Delivery": "capture",
    "DkimKeyPair": "dns", "DNSServer": "dns", "Zone": "dns", "make_dkim_key": "dns",
    "tlsa_rdata": "dns", "txt_rdata": "dns",
    "FakeMX": "mx", "MXFarm": "mx", "MXHandler": "mx", "Received": "mx", "fixed_port": "mx",
    "free_port": "mx", "server_tls": "mx", "write_ca": "mx",
    "HookCall": "recorder", "RecordedVerdict": "recorder", "VerdictRecorder": "recorder",
    "wait_for": "recorder",
}

__all__ = [
    "LOCAL_DOMAIN", "RunningServer", "ServerFactory", "SmtpResult", "context_for", "default_ca",
    "launch", "make_config_dir", "runtime_for", "send", "server_toml", "start_server",
    "dns_server", "fake_mx", "make_dns", "tampu_ca", "tampu_server", *_LAZY,
]


if not TYPE_CHECKING:  # mypy sees the imports above, and no catch-all
    def __getattr__(name: str) -> Any:  # noqa: ANN401 - whatever the named module holds
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'tampu.testing' has no attribute {name!r}")
        value = getattr(importlib.import_module(f"tampu.testing.{module}"), name)
        globals()[name] = value
        return value


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def tampu_ca() -> Any:  # noqa: ANN401 - a trustme.CA
    """The trustme CA that issues the test servers' certificates."""
    import trustme

    return trustme.CA()


@pytest.fixture
def tampu_server(tmp_path: Path, tampu_ca: Any) -> Iterator[ServerFactory]:  # noqa: ANN401 - a trustme.CA
    """Start real tampu servers (see ``launch``); they stop at the end of the test."""
    running: list[RunningServer] = []

    def factory(*, conf: dict[str, str] | None = None,
                plugins: list[Any] | Mapping[str, Any] | None = None,
                users: dict[str, str] | None = None, deliver: bool | None = None,
                base: str | None = None, config_dir: Path | None = None,
                dns: DNSServer | str | None = None, record: bool | VerdictRecorder = False,
                capture: bool | CaptureBackend = False) -> RunningServer:
        srv = launch(tmp_path / f"tampu{len(running)}", ca=tampu_ca, conf=conf,
                     plugins=plugins, users=users, deliver=deliver, base=base,
                     config_dir=config_dir, dns=dns, record=record, capture=capture)
        running.append(srv)
        return srv

    yield factory
    for srv in running:
        srv.stop()


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """A running authoritative DNS server on 127.0.0.1 (empty zone; use its helpers)."""
    from tampu.testing.dns import DNSServer

    with DNSServer() as server:
        yield server


@pytest.fixture
def make_dns() -> Iterator[Callable[..., DNSServer]]:
    """Factory: ``make_dns(zone, timeout={...}, authenticated=False, ttl=60)`` → a running
    DNSServer, stopped after the test."""
    from tampu.testing.dns import DNSServer

    started: list[DNSServer] = []

    def factory(zone: Zone | None = None, timeout: set[str] | None = None, *,
                authenticated: bool = False, ttl: int = 60,
                host: str = "127.0.0.1") -> DNSServer:
        server = DNSServer(zone, host=host, timeout=timeout, authenticated=authenticated,
                           ttl=ttl)
        server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def fake_mx(tampu_ca: Any) -> Iterator[Callable[..., FakeMX]]:  # noqa: ANN401 - a trustme.CA
    """Factory: ``fake_mx(host="127.0.0.1", port=None, tls=False, names=(), ...)`` → a
    running FakeMX, stopped after the test. ``tls=True``: STARTTLS with a certificate from
    ``tampu_ca`` for ``names`` (default: the host and ``localhost``)."""
    from tampu.testing.mx import FakeMX

    started: list[FakeMX] = []

    def factory(host: str = "127.0.0.1", port: int | None = None, *, tls: Any = False,  # noqa: ANN401 - a bool, a CA or an SSLContext
                **kw: Any) -> FakeMX:
        chosen = tampu_ca if tls is True else (tls or None)
        mx = FakeMX(host, port, tls=chosen, **kw).start()
        started.append(mx)
        return mx

    yield factory
    for mx in started:
        mx.stop()
