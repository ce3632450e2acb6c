"""The delivery loop: one asyncio task per queue item, retries, give-up and DSNs.

For each pending recipient the core's relay guard runs first (:func:`relay_refusal`), then
the ``deliver`` hook; each result is written to the item's state before the next recipient.
While some recipients are pending the task sleeps per the retry schedule (``retry_delay``
hook, else ``[server] retry_schedule`` with jitter). When none are pending, or the item is
older than ``give_up_after``, the item is finished: failed recipients go to ``queue_give_up``
and, unless they asked for NOTIFY=NEVER, into a DSN (``make_dsn``, action ``failed``) queued
from ``<>``; the item is removed and ``queue_done`` fired. Recipients that asked for
NOTIFY=SUCCESS get a ``delivered`` DSN, those that asked for NOTIFY=DELAY one ``delayed`` DSN
after ``[server] delay_warning_after``.

Retry schedule (chasquid's): 1 min, then 5, 10, 20 min, then every 20 min, each with ±10%
jitter. Operator requests (``tampu queue retry|delete|hold|release``) arrive through the
store and SIGUSR1; :meth:`DeliveryRunner.handle_requests` serves them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Final

from tampu.addresses import domain_of
from tampu.errors import PluginError, QueueError
from tampu.intake import Intake, Submission, wants
from tampu.item import DeliveryResult, QueueItem, Recipient, RecipientStatus
from tampu.state import ServerState
from tampu.store import QueueStore

log = logging.getLogger("tampu.delivery")

DEFAULT_SCHEDULE: Final = (60.0, 300.0, 600.0, 1200.0)
"""chasquid's: 1, 5, 10, 20 minutes, then every 20 minutes."""
NO_BACKEND = "no delivery backend accepts this recipient"


def schedule_delay(schedule: list[float], attempt: int) -> float:
    """Delay after round ``attempt`` (1-based) with ±10% jitter; the last entry repeats."""
    steps = schedule or DEFAULT_SCHEDULE
    base = steps[max(1, min(attempt, len(steps))) - 1]
    return max(0.0, base * random.uniform(0.9, 1.1))


def trusted(item: QueueItem) -> bool:
    """Mail from an authenticated user, a trusted network, a local program or the server."""
    return item.auth_user is not None or item.trusted_network or \
        item.origin in ("dsn", "forward", "local")


def relay_refusal(is_local_domain: Callable[[str], bool], item: QueueItem,
                  rcpt: Recipient) -> DeliveryResult | None:
    """The core's relay guard: a recipient in a remote domain leaves only for a trusted item
    or a route the local configuration made (forward, via, pipe). No backend can skip it."""
    route = rcpt.route
    if route.pipe is not None or route.forward or route.via or trusted(item):
        return None
    domain = domain_of(rcpt.address)
    if domain and is_local_domain(domain):
        return None
    return DeliveryResult.permanent(
        f"relaying to <{rcpt.address}> denied: not a local address, and the message was "
        "not sent by an authenticated user", enhanced="5.7.1", remote="tampu")


class DeliveryRunner:
    def __init__(self, state: ServerState, intake: Intake) -> None:
        self.state = state
        self.intake = intake
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        self.retry_soon: set[str] = set()
        self._stopping = False
        intake.schedulers.append(self.schedule)

    @property
    def store(self) -> QueueStore:
        return self.state.runtime.store

    async def start(self) -> None:
        """Resume the queue: items are scheduled a batch at a time, so that reception gets
        the event loop between batches even with thousands of items."""
        items = await self.store.recover()
        if items:
            log.info("resuming %d queued item(s)", len(items))
        self.state.spawn(self._resume(items))

    async def _resume(self, items: list[QueueItem]) -> None:
        for i, item in enumerate(items):
            self.schedule(item)
            if i % 50 == 49:
                await asyncio.sleep(0.01)

    def schedule(self, item: QueueItem, message: bytes | None = None) -> None:
        if self._stopping or item.id in self.tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(item, message),
                                                      name=f"qid={item.id}")
        self.tasks[item.id] = task
        task.add_done_callback(functools.partial(self._forget, item.id))

    def _forget(self, qid: str, _task: asyncio.Task[None] | None = None) -> None:
        self.tasks.pop(qid, None)
        self.wakeups.pop(qid, None)
        self.retry_soon.discard(qid)

    async def schedule_id(self, qid: str) -> None:
        """Schedule an item another process (a reception worker) wrote."""
        if qid and qid not in self.tasks:
            try:
                self.schedule(await self.store.load(qid))
            except QueueError as exc:
                log.error("qid=%s: cannot load item from a worker: %s", qid, exc)

    async def handle_requests(self) -> None:
        """Serve ``tampu queue`` (SIGUSR1): new items, retries, deletions, holds."""
        await self.rescan()
        for action, qid in await self.store.take_requests():
            targets = list(self.tasks) if qid == "all" else [qid]
            if action == "retry":
                for key in targets:
                    self.retry_soon.add(key)
                    if key in self.wakeups:
                        self.wakeups[key].set()
                log.info("retry requested for %s: %d item(s) woken", qid, len(targets))
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
        """Pick up items written by other processes (workers, ``tampu queue``)."""
        n = 0
        for qid in await self.store.ids():
            if qid not in self.tasks:
                try:
                    item = await self.store.load(qid)
                except QueueError as exc:
                    if await self.store.exists(qid):  # else: finished meanwhile
                        await self.store.quarantine(qid, str(exc))
                    continue
                if not item.held:
                    self.schedule(item)
                    n += 1
        return n

    async def stop(self) -> None:
        self._stopping = True
        for task in self.tasks.values():
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=10)

    # ------------------------------------------------------------------ one item

    async def _run(self, item: QueueItem, message: bytes | None) -> None:
        failures = 0
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
            settings = self.state.runtime.config.server
            if message is None:
                if not await self.store.exists(item.id):
                    log.info("qid=%s removed from the queue by an operator", item.id)
                    await self.store.remove(item)  # a state file written meanwhile
                    return
                message = await self.store.read_message(item.id)
            pending = item.pending
            sent: list[Recipient] = []
            for i, rcpt in enumerate(pending):
                # Each result is on disk before the next recipient. After the last one the
                # round's end writes it, or the item is removed: a crash in between only
                # means delivering that recipient again (twice is allowed, never zero times).
                await self._attempt(item, rcpt, message, persist=i < len(pending) - 1)
                if rcpt.status is RecipientStatus.SENT:
                    sent.append(rcpt)
            item.attempts += 1
            await self._notify(item, [r for r in sent if wants(r, "SUCCESS")], message,
                               "delivered")
            expired = time.time() - item.created >= settings.give_up_after
            if not item.pending or expired:
                await self._finish(item, message, expired)
                return
            await self._warn_delay(item, message)
            delay = await self._delay(item)
            item.next_attempt = time.time() + delay
            await self.store.save_state(item)
            await self._wait(item, delay)

    async def _delay(self, item: QueueItem) -> float:
        settings = self.state.runtime.config.server
        delay = None
        if item.id in self.retry_soon:
            self.retry_soon.discard(item.id)
            delay = 0.0
        else:
            try:
                delay = await self.state.runtime.hooks.retry_delay(item, item.attempts)
            except PluginError:
                pass
        if delay is None:
            delay = schedule_delay(settings.retry_schedule, item.attempts)
        remaining = item.created + settings.give_up_after - time.time()
        return max(0.0, min(delay, remaining))

    async def _wait(self, item: QueueItem, delay: float) -> None:
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
        self.retry_soon.discard(item.id)

    async def _attempt(self, item: QueueItem, rcpt: Recipient, message: bytes,
                       persist: bool = True) -> None:
        runtime = self.state.runtime
        start = time.monotonic()
        backend = "core"
        result = relay_refusal(runtime.context.is_local_domain, item, rcpt)
        if result is None:
            try:
                result, plugin = await runtime.hooks.deliver(item, rcpt, message)
                backend = plugin or "core"
            except PluginError as exc:
                backend = exc.plugin
                result = DeliveryResult.temporary(f"delivery plugin {exc.plugin} failed: "
                                                  f"{exc.reason}")
        if result is None:
            result = DeliveryResult.permanent(NO_BACKEND)
        rcpt.attempts += 1
        rcpt.last_error = "" if result.status == "sent" else result.text
        rcpt.last_code = result.code
        rcpt.last_enhanced = result.enhanced
        rcpt.last_remote = result.remote
        if result.status == "sent":
            rcpt.status = RecipientStatus.SENT
        elif result.status == "permanent":
            rcpt.status = RecipientStatus.FAILED
        if persist or item.pending:  # skipped only when the item is about to finish
            await self.store.save_state(item)
        log.info("qid=%s from=<%s> to=<%s> attempt=%d status=%s backend=%s remote=%s "
                 "delay=%.3fs reply=%r", item.id, item.mail_from, rcpt.address, rcpt.attempts,
                 result.status, backend, result.remote or "-", time.monotonic() - start,
                 result.text)
        await runtime.hooks.delivery_attempted(item, rcpt, result, backend)

    async def _warn_delay(self, item: QueueItem, message: bytes) -> None:
        after = self.state.runtime.config.server.delay_warning_after
        if not after or time.time() - item.created < after:
            return
        late = [r for r in item.pending if not r.delay_notified and wants(r, "DELAY")]
        for rcpt in late:
            rcpt.delay_notified = True
        await self._notify(item, late, message, "delayed")

    async def _finish(self, item: QueueItem, message: bytes, expired: bool) -> None:
        runtime = self.state.runtime
        if expired and item.pending:
            timed_out = item.pending
            for rcpt in timed_out:
                rcpt.status = RecipientStatus.FAILED
                rcpt.last_error = rcpt.last_error or "no delivery attempt succeeded"
            item.extra["timed_out"] = [r.address for r in timed_out]
            await self.store.save_state(item)
            log.info("qid=%s: giving up after %.0fs on %s", item.id,
                     runtime.config.server.give_up_after,
                     ",".join(f"<{r.address}>" for r in timed_out))
        failed = item.failed
        if failed:
            await runtime.hooks.queue_give_up(item, failed)
            await self._notify(item, [r for r in failed if wants(r, "FAILURE")], message,
                               "failed")
        await self.store.remove(item)
        log.info("qid=%s done: %d sent, %d failed", item.id,
                 sum(r.status is RecipientStatus.SENT for r in item.recipients), len(failed))
        await runtime.hooks.queue_done(item)

    async def _notify(self, item: QueueItem, rcpts: list[Recipient], message: bytes,
                      action: str) -> None:
        """Queue a DSN (``failed``, ``delayed``, ``delivered``) to the sender, if any."""
        if not rcpts:
            return
        if not item.mail_from:
            log.info("qid=%s: %d recipient(s) %s; no DSN for the null sender", item.id,
                     len(rcpts), action)
            return
        try:
            dsn = await self.state.runtime.hooks.make_dsn(item, rcpts, message, action)
        except PluginError:
            dsn = None
        if dsn is None:
            log.warning("qid=%s: no plugin made a %s DSN for %d recipient(s)", item.id,
                        action, len(rcpts))
            return
        new = await self.intake.submit(Submission(mail_from="", recipients=[item.mail_from],
                                                  data=dsn, origin="dsn"), check_full=False)
        log.info("qid=%s: %s DSN queued as %s to <%s>", item.id, action, new.id,
                 item.mail_from)
