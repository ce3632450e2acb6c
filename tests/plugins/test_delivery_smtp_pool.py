"""delivery_smtp under load: connection limits per destination and in all, several recipients
per transaction, reuse of idle connections. Real tampu, real DNS server, real receiving SMTP
servers on 127.0.0.x that count their simultaneous connections."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from typing import Any

import pytest

from tampu.plugins.delivery_smtp.pool import ConnectionPool, DestinationFailed
from tampu.testing import make_config_dir, wait_for
from tests.load_kit import CountingSink, fill_queue, wait_until
from tests.plugins.delivery_kit import Recorder
from tests.plugins.remote_kit import MXFarm, Sink, free_port, remote_conf, submit

ZONE = {
    "one.test": {"MX": ["10 mx.one.test."]},
    "mx.one.test": {"A": ["127.0.0.2"]},
    "two.test": {"MX": ["10 mx.two.test."]},
    "mx.two.test": {"A": ["127.0.0.3"]},
    "shared.test": {"MX": ["10 mx.one.test."]},  # another domain on one.test's MX
    "backup.test": {"MX": ["10 mx.one.test.", "20 mx.two.test."]},
}


@pytest.fixture
def port():
    return free_port("127.0.0.2", ("127.0.0.3",))


@pytest.fixture
def start(tampu_server, tampu_ca, make_dns, tmp_path, port):
    """``start(smtp_extra, queued=[(count, rcpts)])``: tampu delivering to the sinks on
    ``port``; the queued items are in its queue before it starts. Returns (server,
    recorder)."""
    dns = make_dns(ZONE)

    def go(extra: str, *, queued: Sequence[tuple[int, list[str]]] = ()) -> tuple[Any, Recorder]:
        conf = remote_conf(dns.port, port, smtp_extra=extra, domaininfo=False)
        cdir = make_config_dir(tmp_path / "conf", base=conf.pop("base"),
                               conf=conf.pop("conf"), users=conf.pop("users"), ca=tampu_ca)
        for count, rcpts in queued:
            fill_queue(cdir / "data" / "queue", count, rcpts, size=300)
        recorder = Recorder()
        return tampu_server(config_dir=cdir, plugins=[recorder], **conf), recorder

    return go


def test_connections_per_destination_hold_and_are_reused(start, port):
    with CountingSink("127.0.0.2", port, delay=0.05) as sink:
        srv, _ = start("max_connections_per_destination = 5",
                        queued=[(200, ["bob@one.test"])])
        wait_until(lambda: sink.counts.transactions >= 200, 60, "200 deliveries")
        wait_until(lambda: srv.queue_items() == [], 10, "the queue to empty")
        counts = sink.counts
    assert counts.peak == 5  # reached, never more
    assert counts.connections <= 10  # reused: not one per message
    assert counts.rsets >= 190  # each reuse checks the connection first


def test_limit_in_all_holds_across_destinations(start, port):
    with CountingSink("127.0.0.2", port, delay=0.05) as one, \
            CountingSink("127.0.0.3", port, delay=0.05) as two:
        srv, _ = start("max_connections_per_destination = 5\nmax_connections = 6",
                        queued=[(60, ["a@one.test"]), (60, ["b@two.test"])])
        peak = 0

        def all_done() -> bool:
            nonlocal peak
            with one.counts.lock, two.counts.lock:
                peak = max(peak, one.counts.open + two.counts.open)
            return one.counts.transactions + two.counts.transactions >= 120

        wait_until(all_done, 60, "120 deliveries")
        wait_until(lambda: srv.queue_items() == [], 10, "the queue to empty")
    assert one.counts.peak <= 5 and two.counts.peak <= 5
    assert peak <= 6
    assert one.counts.transactions == two.counts.transactions == 60


def test_recipients_of_one_domain_share_a_transaction(start, port):
    with CountingSink("127.0.0.2", port) as one, CountingSink("127.0.0.3", port) as two:
        srv, rec = start("max_recipients_per_transaction = 3")
        rcpts = [f"u{i}@one.test" for i in range(5)] + ["v@two.test", "w@shared.test"]
        submit(srv, rcpts)
        wait_until(lambda: srv.queue_items() == [], 15, "the item to be delivered")
    # one.test: 5 recipients in transactions of at most 3; shared.test (same MX) its own
    assert sorted(one.counts.per_transaction) == [1, 2, 3]
    assert two.counts.per_transaction == [1]
    assert sorted(one.counts.rcpts) == sorted(rcpts[:5] + ["w@shared.test"])
    assert one.counts.connections == 1  # one connection, reused for each transaction
    assert all(rec.first(r).status == "sent" for r in rcpts)


def test_each_recipient_of_a_batch_keeps_its_own_result(start, port):
    farm = MXFarm(port)
    try:
        first = farm.start("127.0.0.2", Sink(rcpt_replies=[
            "250 ok", "550 5.1.1 No such user", "451 4.7.1 Try again later"]))
        second = farm.start("127.0.0.3")
        srv, rec = start("")
        submit(srv, ["ok@backup.test", "gone@backup.test", "later@backup.test"])
        wait_for(lambda: first.received and second.received, what="both MX to get mail")
        results = {a: rec.first(a) for a in ("ok@backup.test", "gone@backup.test",
                                             "later@backup.test")}
    finally:
        farm.stop_all()
    assert [r.rcpt_tos for r in first.received] == [["ok@backup.test"]]
    assert results["ok@backup.test"].status == "sent"
    gone = results["gone@backup.test"]
    assert (gone.status, gone.code, gone.text) == ("permanent", 550, "No such user")
    # the 451 recipient goes on to the next MX, as a lone recipient would
    assert [r.rcpt_tos for r in second.received] == [["later@backup.test"]]
    assert results["later@backup.test"].status == "sent"
    assert results["later@backup.test"].remote == "mx.two.test [127.0.0.3]"


def test_an_idle_connection_is_closed_after_the_idle_timeout(start, port):
    with CountingSink("127.0.0.2", port) as sink:
        srv, _ = start("connection_idle_timeout = 0.5")
        submit(srv, ["bob@one.test"])
        wait_until(lambda: sink.counts.transactions == 1, 10, "the delivery")
        assert sink.counts.open == 1  # kept for the next message
        submit(srv, ["carol@one.test"])
        wait_until(lambda: sink.counts.transactions == 2, 10, "the second delivery")
        assert (sink.counts.connections, sink.counts.rsets) == (1, 1)
        wait_until(lambda: sink.counts.open == 0, 5, "the idle connection to close")


def test_a_connection_the_remote_closed_is_replaced(start, port):
    farm = MXFarm(port)
    try:
        sink = farm.start("127.0.0.2")
        srv, rec = start("connection_idle_timeout = 30")
        submit(srv, ["bob@one.test"])
        wait_for(lambda: sink.received, what="the first delivery")
        farm.stop("127.0.0.2")  # closes its side of the idle connection
        sink = farm.start("127.0.0.2")
        submit(srv, ["carol@one.test"])
        got = wait_for(lambda: sink.received, what="the delivery on a new connection")
    finally:
        farm.stop_all()
    assert got[0].rcpt_tos == ["carol@one.test"]
    assert rec.first("carol@one.test").status == "sent"
    assert rec.for_address("carol@one.test")[0].status == "sent"  # at the first attempt


def test_without_reuse_each_transaction_has_its_connection(start, port):
    with CountingSink("127.0.0.2", port) as sink:
        srv, _ = start("connection_idle_timeout = 0", queued=[(5, ["bob@one.test"])])
        wait_until(lambda: srv.queue_items() == [], 15, "the queue to empty")
        wait_until(lambda: sink.counts.open == 0, 5, "every connection to close")
    assert (sink.counts.connections, sink.counts.transactions, sink.counts.rsets) == (5, 5, 0)


# ------------------------------------------------------------------------- the pool itself


def test_waiters_learn_at_once_that_a_connection_failed():
    """A connection refused: the deliveries queued for the same address do not each wait
    their turn to fail the same way."""
    from tampu import DeliveryResult
    from tampu.plugins.delivery_smtp.client import ClientConfig, Job, NextHost, deliver_to
    from tampu.plugins.delivery_smtp.mx import Target

    with socket.socket() as listener:  # accepts into its backlog, never greets
        listener.bind(("127.0.0.2", 0))
        listener.listen(16)
        port = listener.getsockname()[1]

        async def scenario() -> tuple[list[Any], float, int]:
            import ssl

            pool = ConnectionPool(per_destination=1, total=10)
            cfg = ClientConfig(helo="localhost", connect_timeout=0.5, command_timeout=0.5,
                               data_timeout=0.5, verified_tls=ssl.create_default_context(),
                               unverified_tls=ssl.create_default_context())
            job = Job("a@example.test", ("b@one.test",), b"Subject: x\r\n\r\nx\r\n", False)
            start = time.monotonic()
            outcomes = await asyncio.gather(*[
                deliver_to(cfg, Target("mx.one.test", port), "127.0.0.2", job, None,
                           pool=pool) for _ in range(5)], return_exceptions=True)
            return outcomes, time.monotonic() - start, pool.open_connections

        outcomes, took, left = asyncio.run(scenario())
    assert all(isinstance(o, NextHost) for o in outcomes), outcomes
    assert all(isinstance(o.result, DeliveryResult) and o.result.status == "temporary"
               for o in outcomes if isinstance(o, NextHost))
    assert took < 1.5  # one greeting timeout (0.5 s), not five in a row
    assert left == 0
    assert issubclass(DestinationFailed, Exception)
