"""Shared fixtures. The server factory ``tampu_server`` comes from ``tampu.testing``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.dnsserver import DNSServer, Zone


def require_tool(name: str) -> str:
    """The path of an external tool; skip if missing (fail under TAMPU_REQUIRE_TOOLS=1)."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)
    if path is None:
        msg = f"{name} is not installed (apt-get install it; see README)"
        if os.environ.get("TAMPU_REQUIRE_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """A running authoritative DNS server on 127.0.0.1 (empty zone; use ``.set``)."""
    with DNSServer() as server:
        yield server


@pytest.fixture
def make_dns() -> Iterator[object]:
    """Factory: ``make_dns(zone, timeout={...})`` → a running DNSServer, stopped after."""
    started: list[DNSServer] = []

    def factory(zone: Zone | None = None, timeout: set[str] | None = None) -> DNSServer:
        server = DNSServer(zone, timeout=timeout)
        server.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()
