"""The queue under attack, at 5,000 items: a restart must not starve reception, outgoing
connections per MX stay within the limit, a retry request reaches every item.

Figures are printed (``pytest -s``); the assertions are bounds with room for a busy machine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tampu import DeliveryResult, QueueItem, Recipient, hookimpl
from tampu.testing import make_config_dir, server_toml
from tests.dnsserver import DNSServer
from tests.helpers import maildir_conf
from tests.load_kit import CountingSink, fill_queue, first_transaction, tampu_serve, wait_until
from tests.plugins.remote_kit import free_port
from tests.recording import fixed_port

pytestmark = pytest.mark.slow

ITEMS = 5000


def _serve_config(root: Path, dns_port: int, mx_port: int, port: int) -> Path:
    return make_config_dir(root, base=maildir_conf(
        port, f'dns_servers = ["127.0.0.1:{dns_port}"]\nmax_queue_items = 20000\n',
        f"[plugins.delivery_smtp]\nenabled = true\nport = {mx_port}\n", shutdown_timeout=1),
        users={"user@example.test": "pw"})


def test_restart_with_5000_queued_items(tmp_path):
    """``tampu serve`` restarted over 5,000 items for one remote domain (one MX): the first
    transaction completes about as soon as with an empty queue, and the MX never sees more
    than the default 20 connections from us, reused for message after message."""
    mx_port = free_port("127.0.0.2", ())
    zone = {"remote.test": {"MX": ["10 mx.remote.test."]},
            "mx.remote.test": {"A": ["127.0.0.2"]}}
    with DNSServer(zone) as dns, CountingSink("127.0.0.2", mx_port, delay=0.1) as sink:
        port = fixed_port()
        empty = _serve_config(tmp_path / "empty", dns.port, mx_port, port)
        with tampu_serve(empty) as (_, started):
            baseline = first_transaction(port, started, "user@example.test")

        port = fixed_port()
        full = _serve_config(tmp_path / "full", dns.port, mx_port, port)
        fill_queue(full / "data" / "queue", ITEMS, ["bob@remote.test"])
        with tampu_serve(full) as (_, started):
            loaded = first_transaction(port, started, "user@example.test")
            wait_until(lambda: sink.counts.transactions >= 1000, 90, "1000 deliveries")
            rate_at = time.monotonic()
            delivered = sink.counts.transactions
        counts = sink.counts
    print(f"\nempty queue: greeting {baseline.greeting:.3f}s, first transaction "
          f"{baseline.first_transaction:.3f}s; {ITEMS} queued: greeting {loaded.greeting:.3f}s, "
          f"first transaction {loaded.first_transaction:.3f}s; {delivered} delivered after "
          f"{rate_at - started:.1f}s over {counts.connections} connection(s), at most "
          f"{counts.peak} at once, {counts.rsets} RSET")
    assert loaded.first_transaction - loaded.greeting < 0.5
    assert loaded.first_transaction - baseline.first_transaction < 0.75
    assert loaded.first_transaction < 4.0  # the target is under 2 s; Python's start is ~1 s
    assert counts.peak == 20  # max_connections_per_destination's default, reached
    assert counts.connections <= delivered // 50  # reused (connection_max_messages = 100)


class FirstTimeLater:
    """Every recipient fails temporarily at its first attempt (retry in an hour), then is
    delivered; each attempt takes a little while, so that many are in flight at once. The
    start of each attempt is recorded."""

    name = "first-time-later"
    priority = 10

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: dict[str, list[float]] = {}

    @hookimpl
    async def deliver(self, item: QueueItem, recipient: Recipient,
                      message: bytes) -> DeliveryResult:
        with self.lock:
            self.starts.setdefault(item.id, []).append(time.monotonic())
        await asyncio.sleep(0.005)
        if recipient.attempts == 0:
            return DeliveryResult.temporary("not now")
        return DeliveryResult.sent(remote="test")

    @hookimpl
    def retry_delay(self, item: QueueItem, attempt: int) -> float:
        return 3600.0

    def count(self, what: Any) -> Any:  # noqa: ANN401
        with self.lock:
            return what(self.starts)


def test_retry_request_reaches_all_of_5000_items(tampu_server, tmp_path, tampu_ca):
    """``tampu queue retry`` while 5,000 items are at every stage (waiting an hour after a
    failed attempt, in flight, just finished, waiting for a slot, not loaded yet): every one
    gets an attempt that starts after the request, none waits the hour."""
    cdir = make_config_dir(tmp_path / "conf", ca=tampu_ca, base=server_toml(
        extra="max_queue_items = 20000"))
    fill_queue(cdir / "data" / "queue", ITEMS, ["u@example.test"], size=200)
    backend = FirstTimeLater()
    srv = tampu_server(config_dir=cdir, plugins=[backend], deliver=True)
    wait_until(lambda: backend.count(len) >= ITEMS // 5, 60, "a fifth of the first attempts")
    asyncio.run(srv.store.request("retry", []))  # what `tampu queue retry` does
    asked = time.monotonic()
    before = backend.count(len)
    srv.loop.call_soon_threadsafe(srv.server.handle_requests)  # ...and its SIGUSR1

    def late() -> int:  # items without an attempt started after the request
        return backend.count(lambda starts: ITEMS - sum(
            1 for times in starts.values() if times[-1] >= asked))

    wait_until(lambda: late() == 0, 100, "every item to be attempted after the request")
    took = time.monotonic() - asked
    twice = backend.count(lambda starts: sum(1 for t in starts.values() if len(t) == 2))
    print(f"\n{before} items attempted before the request; all {ITEMS} attempted again or "
          f"for the first time within {took:.1f}s of it ({twice} twice)")
    assert twice >= before  # those attempted before it were attempted again
    assert backend.count(lambda starts: max(len(t) for t in starts.values())) == 2
