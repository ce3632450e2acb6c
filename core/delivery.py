"""The delivery loop: one asyncio task per queue item, its rounds and the waits between them.

Each round of an item first waits for a delivery slot (``[server] max_deliveries`` rounds at
once, all backends together; waiting rounds get freed slots in turn by destination domain, so
that a backlog for one domain does not hold up mail for the others). The round itself — the
core's relay guard, then the delivery backends in order, each result written to the item's
state — is :mod:`tampu.delivery_round`. While some recipients are pending the task sleeps per
the retry schedule, without the message bytes in memory; when none are pending, or the item
is older than ``give_up_after``, the item is finished: the retry schedule, the give-up and
the DSNs are :mod:`tampu.delivery_outcome`.

At start the queue is resumed in the background, after the listeners are open: the store
lists the items (:meth:`QueueStore.recover`), and a feeder loads and schedules them, oldest
first, only as fast as slots free up (at most :data:`ADMIT_AHEAD` times ``max_deliveries``
loaded items wait for a slot), so that a queue of thousands neither delays the greeting nor
starves reception.

With ``[server] workers = N`` every process runs a runner for the items it queued: a reception
worker's runner makes the first rounds of its own items and hands an item that must wait for
a retry to the main process (``hand_over``), whose runner owns every waiting item, resumes the
queue at start (except the items of live workers: ``owned_elsewhere``), serves operator
requests, and takes over the items of a worker that died (:meth:`DeliveryRunner.take_over`).

Operator requests (``tampu queue retry|delete|hold|release``) arrive through the store and
SIGUSR1; :meth:`DeliveryRunner.handle_requests` serves them. A retry request reaches every
item: one waiting is woken, one whose round is in flight (or just finished) starts its next
round at once, one waiting for a slot or not loaded yet attempts anyway.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from tampu.addresses import domain_of
from tampu.delivery_outcome import finish, next_delay, notify, schedule_delay, warn_delay
from tampu.delivery_round import deliver_round
from tampu.errors import QueueError
from tampu.intake import Intake, wants
from tampu.item import QueueItem
from tampu.state import ServerState
from tampu.store import QueueStore

log = logging.getLogger("tampu.delivery")

ADMIT_AHEAD: Final = 10
"""The feeder keeps up to this many times ``max_deliveries`` loaded items waiting for a slot:
enough for freed slots to go to every destination in turn, few enough to stay cheap."""


def destination_key(item: QueueItem) -> str:
    """Whom the item's next round is mostly for: the first pending recipient's via host or
    domain (the key delivery slots are shared by)."""
    for rcpt in item.recipients:
        if rcpt.pending:
            via = rcpt.route.via
            if via:
                return via[0].lower()
            return domain_of(rcpt.address) or rcpt.address.lower()
    return ""


def _nobody(_qid: str) -> bool:
    return False


class DeliverySlots:
    """At most ``limit`` rounds deliver at once. Rounds that wait queue by destination key;
    each freed slot goes to the next key in turn (round robin), first come first served
    within a key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.waiting = 0
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._turns: deque[str] = deque()

    def set_limit(self, limit: int) -> None:
        """A reload may change ``[server] max_deliveries``."""
        if limit != self.limit:
            self.limit = limit
            self._grant()

    async def acquire(self, key: str) -> None:
        if self.active < self.limit and not self._turns:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._turns.append(key)
        queue.append(fut)
        self.waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot came just as the task was cancelled
            else:
                self._forget(key, fut)
            raise

    def release(self) -> None:
        self.active -= 1
        self._grant()

    def _forget(self, key: str, fut: asyncio.Future[None]) -> None:
        queue = self._queues.get(key)
        if queue is not None and fut in queue:
            queue.remove(fut)
            self.waiting -= 1
            if not queue:
                del self._queues[key]
                self._turns.remove(key)

    def _grant(self) -> None:
        while self.active < self.limit and self._turns:
            key = self._turns.popleft()
            queue = self._queues[key]
            fut = queue.popleft()
            self.waiting -= 1
            if queue:
                self._turns.append(key)
            else:
                del self._queues[key]
            if not fut.done():
                fut.set_result(None)
                self.active += 1


class DeliveryRunner:
    def __init__(self, state: ServerState, intake: Intake, *, resume: bool = True,
                 hand_over: Callable[[QueueItem], bool] | None = None,
                 owned_elsewhere: Callable[[str], bool] | None = None) -> None:
        self.state = state
        self.intake = intake
        self.resume = resume
        """Resume the queue at start (the main process; not a reception worker)."""
        self.hand_over = hand_over
        """Called with an item that must wait for its next round (its state saved): True
        when another process took it (a reception worker gives it to the main process)."""
        self.owned_elsewhere = owned_elsewhere or _nobody
        """Whether another live process delivers this item (a reception worker's)."""
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        """Items waiting for their next round (the event wakes them)."""
        self.retry_soon: set[str] = set()
        """Items asked to retry while not waiting: their next round starts without a delay.
        Cleared when a round starts (that round answers the request)."""
        self.slots = DeliverySlots(state.runtime.config.server.max_deliveries)
        self._backlog: deque[str] = deque()
        """Items to load and schedule (recovery at start, rescans), oldest first."""
        self._backlogged: set[str] = set()
        self._holds = 0
        """Operator holds and releases saved so far (:meth:`_load` reads again when one was
        saved meanwhile)."""
        self._fed = asyncio.Event()
        self._room = asyncio.Semaphore(self.slots.limit * ADMIT_AHEAD)
        """Items the feeder scheduled that have not reached a slot yet: a bounded number."""
        self._tickets: set[str] = set()
        self._feeder: asyncio.Task[None] | None = None
        self._stopping = False
        self.hand_back = False
        """Set by the claim loop of a shared queue (:mod:`tampu.claims`): a round that leaves
        recipients pending ends the item's task, the item due again for any node at its next
        attempt; items of other processes come through claims, not rescans or workers."""
        intake.schedulers.append(self.schedule)

    @property
    def store(self) -> QueueStore:
        return self.state.runtime.store

    async def start(self) -> None:
        """Resume the queue in the background: returns at once, so the listeners open before
        any item is read; the items are loaded as delivery slots free up."""
        self._feeder = asyncio.get_running_loop().create_task(self._feed(),
                                                              name="delivery-feeder")
        if self.resume:
            self.state.spawn(self._recover())

    async def _recover(self) -> None:
        started = time.monotonic()
        ids = [qid for qid in await self.store.recover() if not self.owned_elsewhere(qid)]
        if ids:
            log.info("resuming %d queued item(s) (listed in %.2fs)", len(ids),
                     time.monotonic() - started)
        self._enqueue(ids)

    def _enqueue(self, ids: list[str]) -> None:
        for qid in ids:
            if qid not in self._backlogged and qid not in self.tasks \
                    and qid not in self.intake.in_hand:  # the intake schedules it
                self._backlogged.add(qid)
                self._backlog.append(qid)
        if self._backlog:
            self._fed.set()

    async def _feed(self) -> None:
        """Load and schedule backlog items, no faster than they get delivery slots."""
        while not self._stopping:
            if not self._backlog:
                self._fed.clear()
                await self._fed.wait()
                continue
            await self._room.acquire()
            qid = self._backlog.popleft()
            self._backlogged.discard(qid)
            ticket = False
            try:
                if qid in self.tasks:
                    continue
                try:
                    item = await self._load(qid)
                except QueueError as exc:
                    if await self.store.exists(qid):  # else: finished meanwhile
                        await self.store.quarantine(qid, str(exc))
                    continue
                if item.held or qid in self.tasks:
                    continue
                ticket = self.schedule(item)
                if ticket:
                    self._tickets.add(qid)
            except Exception:
                log.exception("qid=%s: cannot resume this item", qid)
            finally:
                if not ticket:
                    self._room.release()

    async def _load(self, qid: str) -> QueueItem:
        """The item as stored, read again when an operator's hold or release was saved
        while it was read (that copy may say "not held" of an item just held)."""
        while True:
            holds = self._holds
            item = await self.store.load(qid)
            if holds == self._holds:
                return item

    def _release_ticket(self, qid: str) -> None:
        if qid in self._tickets:
            self._tickets.discard(qid)
            self._room.release()

    def schedule(self, item: QueueItem, message: bytes | None = None, *,
                 not_before: float = 0.0) -> bool:
        """Start the item's task (unless it has one); its first round not before
        ``not_before`` (a time). True if a task was started."""
        if self._stopping or item.id in self.tasks:
            return False
        task = asyncio.get_running_loop().create_task(self._run(item, message, not_before),
                                                      name=f"qid={item.id}")
        self.tasks[item.id] = task
        task.add_done_callback(functools.partial(self._forget, item.id))
        return True

    def _forget(self, qid: str, _task: asyncio.Task[None] | None = None) -> None:
        self.tasks.pop(qid, None)
        self.wakeups.pop(qid, None)
        self.retry_soon.discard(qid)
        self._release_ticket(qid)

    async def schedule_id(self, qid: str, *, wait: bool = False) -> None:
        """Schedule an item another process (a reception worker) wrote; ``wait``: its next
        round when its state says (one handed over after a round)."""
        if self.hand_back:  # a shared queue: the claim loop takes it, under a lease
            return
        if qid and qid not in self.tasks:
            try:
                item = await self._load(qid)
            except QueueError as exc:
                log.error("qid=%s: cannot load item from a worker: %s", qid, exc)
                return
            if not item.held:
                self.schedule(item, not_before=item.next_attempt if wait else 0.0)

    async def take_over(self, owned: Callable[[str], bool]) -> int:
        """Deliver the items for which ``owned`` is true (those of a reception worker that
        died); they join the backlog, oldest first. The number taken."""
        ids = [qid for qid in await self.store.ids() if owned(qid) and qid not in self.tasks]
        self._enqueue(ids)
        return len(ids)

    async def handle_requests(self) -> None:
        """Serve ``tampu queue`` (SIGUSR1): new items, retries, deletions, holds."""
        await self.rescan()
        for action, qid in await self.store.take_requests():
            targets = [qid]
            if qid == "all":  # retry: what has a task; the others are in the store (held,
                # or not loaded yet: they attempt when loaded)
                targets = list(self.tasks) if action == "retry" else await self.store.ids()
            if action == "retry":
                woken = 0
                for key in targets:
                    if key not in self.tasks:
                        continue  # not loaded yet: it attempts as soon as it is
                    self.retry_soon.add(key)
                    if key in self.wakeups:
                        self.wakeups[key].set()
                        woken += 1
                log.info("retry requested for %s: %d waiting item(s) woken, %d in flight",
                         qid, woken, len([k for k in targets if k in self.tasks]) - woken)
            elif action in ("hold", "release"):
                await self._set_held(targets, action == "hold")
            elif action == "delete":
                for key in targets:
                    await self._delete(key)

    async def _set_held(self, ids: list[str], held: bool) -> None:
        for qid in ids:
            try:
                item = await self.store.load(qid)
            except QueueError:
                continue
            item.held = held
            await self.store.save_state(item)
            self._holds += 1
            task = self.tasks.get(qid)
            if task is not None and not held:
                self.retry_soon.add(qid)
                if qid in self.wakeups:
                    self.wakeups[qid].set()
            elif task is not None:
                task.cancel()  # a held item waits in the store until released
            elif not held:
                self.schedule(item)
            log.info("qid=%s %s by an operator", qid, "held" if held else "released")

    async def _delete(self, qid: str) -> None:
        task = self.tasks.get(qid)
        if task is not None:
            task.cancel()
        try:
            item = await self.store.load(qid)
        except QueueError:
            return
        await self.store.remove(item)
        log.info("qid=%s deleted by an operator", qid)

    async def rescan(self) -> int:
        """Pick up items written by other processes (workers, ``tampu queue``): they join
        the feeder's backlog (held ones are skipped when loaded)."""
        if self.hand_back:  # a shared queue: items are claimed, never taken unleased
            return 0
        before = len(self._backlog)
        self._enqueue([qid for qid in await self.store.ids()
                       if qid not in self.tasks and not self.owned_elsewhere(qid)])
        return len(self._backlog) - before

    async def stop(self) -> None:
        self._stopping = True
        if self._feeder is not None:
            self._feeder.cancel()
            self._fed.set()
        for task in self.tasks.values():
            task.cancel()
        waited = [*self.tasks.values(), *([self._feeder] if self._feeder else [])]
        if waited:
            await asyncio.wait(waited, timeout=10)

    # ------------------------------------------------------------------ one item

    async def _run(self, item: QueueItem, message: bytes | None, not_before: float = 0.0
                   ) -> None:
        failures = 0
        if not_before > time.time():
            await self._wait(item, not_before - time.time())
        while not self._stopping:
            try:
                await self._deliver_item(item, message)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                message = None
                delay = schedule_delay(self.state.runtime.config.server.retry_schedule,
                                       failures)
                log.exception("qid=%s: delivery task failed; trying again in %.0fs", item.id,
                              delay)
                await asyncio.sleep(delay)

    async def _deliver_item(self, item: QueueItem, message: bytes | None) -> None:
        if item.held:
            log.info("qid=%s is on hold", item.id)
            return
        while True:
            self.slots.set_limit(self.state.runtime.config.server.max_deliveries)
            await self.slots.acquire(destination_key(item))
            try:
                self._release_ticket(item.id)
                self.retry_soon.discard(item.id)  # this round answers earlier requests
                if message is None:
                    if not await self.store.exists(item.id):
                        log.info("qid=%s removed from the queue by an operator", item.id)
                        await self.store.remove(item)  # a state file written meanwhile
                        return
                    message = await self.store.read_message(item.id)
                sent = await deliver_round(self.state, item, message)
            finally:
                self.slots.release()
            settings = self.state.runtime.config.server
            item.attempts += 1
            await notify(self.state, self.intake, item,
                         [r for r in sent if wants(r, "SUCCESS")], message, "delivered")
            expired = time.time() - item.created >= settings.give_up_after
            if not item.pending or expired:
                await finish(self.state, self.intake, item, message, expired)
                return
            await warn_delay(self.state, self.intake, item, message)
            delay = await next_delay(self.state, item, at_once=item.id in self.retry_soon)
            item.next_attempt = time.time() + delay
            await self.store.save_state(item)
            if self.hand_back:  # a shared queue: due again at next_attempt, for any node
                return
            if self.hand_over is not None and item.id not in self.retry_soon and \
                    self.hand_over(item):
                return  # the main process waits and makes the next rounds
            message = None  # read again for the next round: a waiting item holds no bytes
            await self._wait(item, delay)

    async def _wait(self, item: QueueItem, delay: float) -> None:
        if item.id in self.retry_soon:  # asked while the round's end was being written
            return
        log.info("qid=%s: %d recipient(s) pending, next attempt in %.0fs", item.id,
                 len(item.pending), delay)
        event = self.wakeups.setdefault(item.id, asyncio.Event())
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), timeout=delay)
        except TimeoutError:
            pass
        finally:
            self.wakeups.pop(item.id, None)
