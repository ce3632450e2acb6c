"""The chain of delivery backends (``deliver_batch`` and ``deliver`` in one order), the bound
on concurrent deliveries (``[server] max_deliveries``) and how its slots are shared."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tampu import DeliveryResult, QueueItem, Recipient, hookimpl
from tampu.delivery import DeliverySlots, destination_key
from tampu.reply import RECIPIENT_OK
from tampu.testing import make_config_dir, server_toml
from tests.load_kit import fill_queue, wait_until
from tests.recording import send


class Observer:
    """Accepts every RCPT; records ``delivery_attempted`` and items leaving the queue."""

    name = "observer"
    priority = 1

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: list[tuple[str, str, str, str]] = []  # qid, address, status, backend
        self.done: list[str] = []

    @hookimpl
    def smtp_rcpt_to(self, session: Any, envelope: Any, address: str, params: Any) -> Any:
        return RECIPIENT_OK

    @hookimpl
    def delivery_attempted(self, item: QueueItem, recipient: Recipient,
                           result: DeliveryResult, backend: str) -> None:
        with self.lock:
            self.attempts.append((item.id, recipient.address, result.status, backend))

    @hookimpl
    def queue_done(self, item: QueueItem) -> None:
        with self.lock:
            self.done.append(item.id)

    @hookimpl
    def retry_delay(self, item: QueueItem, attempt: int) -> float:
        return 0.1

    def by_address(self) -> dict[str, list[tuple[str, str]]]:
        with self.lock:
            out: dict[str, list[tuple[str, str]]] = {}
            for _, address, status, backend in self.attempts:
                out.setdefault(address, []).append((status, backend))
            return out


class Single:
    """A per-recipient backend claiming the local parts it is given."""

    def __init__(self, name: str, priority: int, users: set[str],
                 check: Any = None) -> None:
        self.name, self.priority, self.users = name, priority, users
        self.asked: list[str] = []
        self.check = check

    @hookimpl
    def deliver(self, item: QueueItem, recipient: Recipient,
                message: bytes) -> DeliveryResult | None:
        self.asked.append(recipient.address)
        if recipient.address.split("@")[0] not in self.users:
            return None
        if self.check is not None:
            self.check(item)
        return DeliveryResult.sent(remote=self.name)


class Batch:
    """A batch backend: claims the local parts it is given, all in one call."""

    def __init__(self, name: str, priority: int, users: set[str], *,
                 answer: Any = None) -> None:
        self.name, self.priority, self.users = name, priority, users
        self.calls: list[list[str]] = []
        self.answer = answer
        """None: sent for the claimed ones; an exception to raise; a callable(recipients)."""

    @hookimpl
    def deliver_batch(self, item: QueueItem, recipients: list[Recipient],
                      message: bytes) -> list[tuple[Recipient, DeliveryResult]] | None:
        self.calls.append([r.address for r in recipients])
        if isinstance(self.answer, BaseException):
            raise self.answer
        if callable(self.answer):
            return self.answer(recipients)
        mine = [r for r in recipients if r.address.split("@")[0] in self.users]
        return [(r, DeliveryResult.sent(remote=self.name)) for r in mine] or None


def test_backends_are_asked_in_one_order_each_recipient_by_the_first_that_claims_it(
        tampu_server):
    obs = Observer()
    early = Single("early", 10, {"a"})
    bulk = Batch("bulk", 20, {"b1", "b2"})
    late = Single("late", 30, {"c"})
    srv = tampu_server(plugins=[obs, early, bulk, late], deliver=True)
    rcpts = ["a@example.test", "b1@example.test", "c@example.test", "b2@example.test"]
    qid = send(srv, "sender@example.org", rcpts)
    wait_until(lambda: qid in obs.done, 10, "the item to be delivered")
    assert early.asked == rcpts  # first in the order: asked for each recipient
    assert bulk.calls == [["b1@example.test", "c@example.test", "b2@example.test"]]
    assert late.asked == ["c@example.test"]  # what bulk left
    assert obs.by_address() == {
        "a@example.test": [("sent", "early")], "b1@example.test": [("sent", "bulk")],
        "b2@example.test": [("sent", "bulk")], "c@example.test": [("sent", "late")]}
    assert srv.queue_items() == []


def test_a_plugin_with_both_hooks_is_asked_for_the_batch_first(tampu_server):
    class Both(Batch):
        @hookimpl
        def deliver(self, item: QueueItem, recipient: Recipient,
                    message: bytes) -> DeliveryResult | None:
            self.calls.append(["single:" + recipient.address])
            return DeliveryResult.sent(remote="both")

    obs = Observer()
    both = Both("both", 50, {"x"})
    srv = tampu_server(plugins=[obs, both], deliver=True)
    qid = send(srv, "sender@example.org", ["x@example.test", "y@example.test"])
    wait_until(lambda: qid in obs.done, 10, "the item to be delivered")
    assert both.calls == [["x@example.test", "y@example.test"], ["single:y@example.test"]]


def test_batch_results_are_on_disk_before_the_next_backend_is_asked(tampu_server):
    obs = Observer()
    seen: list[list[str]] = []
    srv: Any = None

    def check(item: QueueItem) -> None:  # called by "late" during its delivery
        stored = srv.store.load_now(item.id)
        seen.append([r.status.value for r in stored.recipients])

    bulk = Batch("bulk", 20, {"b"})
    late = Single("late", 30, {"c"}, check=check)
    srv = tampu_server(plugins=[obs, bulk, late], deliver=True)
    qid = send(srv, "sender@example.org", ["b@example.test", "c@example.test"])
    wait_until(lambda: qid in obs.done, 10, "the item to be delivered")
    assert seen == [["sent", "pending"]]


def test_relay_guard_runs_before_a_batch_backend(tampu_server):
    obs = Observer()
    bulk = Batch("bulk", 20, {"far", "near"})
    srv = tampu_server(plugins=[obs, bulk], deliver=True)
    # unauthenticated mail: a remote recipient must not leave, whatever a backend claims
    qid = send(srv, "stranger@elsewhere.example", ["far@remote.example", "near@example.test"])
    wait_until(lambda: qid in obs.done, 10, "the item to finish")
    assert bulk.calls == [["near@example.test"]]
    got = obs.by_address()
    assert got["far@remote.example"] == [("permanent", "core")]
    assert got["near@example.test"] == [("sent", "bulk")]


@pytest.mark.parametrize("answer", ["crash", "stranger", "twice", "not-a-result"])
def test_a_failing_batch_backend_is_a_temporary_failure_of_what_it_was_given(
        tampu_server, answer):
    def bad(recipients: list[Recipient]) -> Any:
        if answer == "stranger":
            return [(Recipient("z@example.test", "z@example.test"), DeliveryResult.sent())]
        if answer == "twice":
            return [(recipients[0], DeliveryResult.sent())] * 2
        return [(recipients[0], "sent")]

    obs = Observer()
    bulk = Batch("bulk", 20, {"b"}, answer=RuntimeError("batch bug") if answer == "crash"
                 else bad)
    late = Single("late", 30, {"b", "c"})
    srv = tampu_server(plugins=[obs, bulk, late], deliver=True)
    qid = send(srv, "sender@example.org", ["b@example.test", "c@example.test"])
    wait_until(lambda: len(obs.attempts) >= 2, 10, "the first round")
    first = [(a, s, b) for _, a, s, b in obs.attempts[:2]]
    assert first == [("b@example.test", "temporary", "bulk"),
                     ("c@example.test", "temporary", "bulk")]
    assert late.asked == []  # the recipients were bulk's this round
    item = srv.store.load_now(qid)
    assert all("delivery plugin bulk failed" in r.last_error for r in item.recipients)
    bulk.answer = None  # fixed: the next round delivers
    wait_until(lambda: qid in obs.done, 10, "the item to be delivered on retry")
    got = obs.by_address()
    assert got["b@example.test"][-1] == ("sent", "bulk")
    assert got["c@example.test"][-1] == ("sent", "late")


# ------------------------------------------------------------------------- max_deliveries


class Slow:
    """A per-recipient async backend that takes ``seconds`` and counts overlapping calls."""

    name = "slow"
    priority = 50

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.order: list[str] = []

    @hookimpl
    async def deliver(self, item: QueueItem, recipient: Recipient,
                      message: bytes) -> DeliveryResult:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            with self.lock:
                self.now -= 1
                self.order.append(recipient.address)
        return DeliveryResult.sent(remote="slow")


def _queued_server(tampu_server, tmp_path, items: list[tuple[int, list[str]]],
                   plugins: list[Any], **server: Any) -> Any:
    domains = ("example.test", "other.test")
    extra = "".join(f"{k} = {v}\n" for k, v in server.items())
    cdir = make_config_dir(tmp_path / "conf", base=server_toml(domains=domains, extra=extra))
    for count, rcpts in items:  # oldest first
        fill_queue(cdir / "data" / "queue", count, rcpts, size=100)
        time.sleep(0.01)  # queue IDs sort by the millisecond
    return tampu_server(config_dir=cdir, plugins=plugins, deliver=True)


def test_max_deliveries_bounds_deliveries_at_once(tampu_server, tmp_path):
    slow = Slow(0.2)
    obs = Observer()
    srv = _queued_server(tampu_server, tmp_path, [(12, ["u@example.test"])], [obs, slow],
                         max_deliveries=3)
    wait_until(lambda: len(obs.done) == 12, 20, "the queue to be delivered")
    assert slow.peak == 3  # reached, never more
    assert srv.queue_items() == []


def test_freed_slots_go_to_each_destination_in_turn(tampu_server, tmp_path):
    slow = Slow(0.1)
    obs = Observer()
    _queued_server(tampu_server, tmp_path, [(15, ["u@example.test"]),
                                            (3, ["v@other.test"])], [obs, slow],
                   max_deliveries=2)
    wait_until(lambda: len(obs.done) == 18, 20, "the queue to be delivered")
    firsts = [slow.order.index("v@other.test")]
    # first come, first served would deliver the 15 older items of example.test first
    assert firsts[0] < 6, slow.order
    assert len([a for a in slow.order[:10] if a == "v@other.test"]) == 3, slow.order


def test_delivery_slots_round_robin_and_cancellation():
    async def scenario() -> list[str]:
        slots = DeliverySlots(1)
        got: list[str] = []
        await slots.acquire("a")  # taken: the rest wait

        async def one(key: str, label: str) -> None:
            await slots.acquire(key)
            got.append(label)
            await asyncio.sleep(0)
            slots.release()

        tasks = [asyncio.create_task(one(k, f"{k}{i}")) for i, k in
                 enumerate(["a", "a", "a", "b", "c", "c"])]
        doomed = asyncio.create_task(one("b", "never"))
        await asyncio.sleep(0.01)
        assert slots.waiting == 7
        doomed.cancel()
        await asyncio.sleep(0)
        assert slots.waiting == 6
        slots.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert (slots.active, slots.waiting) == (0, 0)
        slots.set_limit(2)
        await slots.acquire("x")
        await slots.acquire("y")  # two at once now
        assert slots.active == 2
        return got

    assert asyncio.run(scenario()) == ["a0", "b3", "c4", "a1", "c5", "a2"]


def test_destination_key_is_the_first_pending_recipients_domain_or_via_host():
    from tampu.item import RecipientStatus, Route

    done = Recipient("a@done.test", "a@done.test", status=RecipientStatus.SENT)
    item = QueueItem(id="x", mail_from="", recipients=[
        done, Recipient("b@Next.Test", "b@next.test"),
        Recipient("c@via.test", "c@via.test", route=Route(via=("Relay.Example:2525",)))])
    assert destination_key(item) == "next.test"
    item.recipients[1].status = RecipientStatus.FAILED
    assert destination_key(item) == "relay.example:2525"


def test_hold_and_release_all_reach_items_not_loaded_yet(tampu_server, tmp_path):
    slow = Slow(0.3)
    obs = Observer()
    srv = _queued_server(tampu_server, tmp_path, [(20, ["u@example.test"])], [obs, slow],
                         max_deliveries=1)  # 10 loaded ahead, 9 not loaded yet
    wait_until(lambda: slow.now == 1, 10, "the first delivery to start")
    asyncio.run(srv.store.request("hold", []))  # `tampu queue hold` (all)
    srv.loop.call_soon_threadsafe(srv.server.handle_requests)

    def held() -> int:
        return sum(srv.store.load_now(q).held for q in srv.queue_items())

    wait_until(lambda: held() >= 18, 10, "every waiting item to be held")
    time.sleep(1)
    assert len(obs.done) <= 2  # the one in flight (and one starting) finished; no more
    asyncio.run(srv.store.request("release", []))
    srv.loop.call_soon_threadsafe(srv.server.handle_requests)
    wait_until(lambda: srv.queue_items() == [], 30, "every item to be delivered")
    assert len(set(obs.done)) == 20
