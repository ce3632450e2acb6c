"""The delivery loop: one asyncio task per queue item, retries, give-up and DSNs.

For each pending recipient the ``deliver`` hook is asked; each result is written to the item's
state file before the next recipient. While some recipients are pending the task sleeps per
the retry schedule (``retry_delay`` hook, else ``[server] retry_schedule`` with jitter). When
none are pending, or the item is older than ``give_up_after``, the item is finished: failed
recipients go to ``queue_give_up`` and ``make_dsn``, the DSN is queued from ``<>``, the item
removed and ``queue_done`` fired.

Retry schedule (chasquid's): after the first round 1 min, then 5, 10, 20 min, then every 20 min,
each with ±10% jitter so that a restart does not retry everything at once. Recipients still
pending at give-up time fail with their last error kept as it was (the remote's reply, for the
DSN's Diagnostic-Code); ``item.extra["timed_out"]`` lists them, so that a DSN can report
``4.4.7`` (delivery time expired) when the backend gave no enhanced code.

``tampu queue retry|delete`` (another process) asks for work through files in
``queue/retry/`` and SIGUSR1; :meth:`DeliveryRunner.handle_requests` serves them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from typing import TYPE_CHECKING, Final

from tampu.errors import PluginError, QueueError
from tampu.item import DeliveryResult, QueueItem, Recipient, RecipientStatus

if TYPE_CHECKING:
    from tampu.context import ServerContext
    from tampu.queue import Queue
    from tampu.server import ServerState

log = logging.getLogger("tampu.delivery")


DEFAULT_SCHEDULE: Final = (60.0, 300.0, 600.0, 1200.0)
"""chasquid's: 1, 5, 10, 20 minutes, then every 20 minutes."""


def schedule_delay(schedule: list[float], attempt: int) -> float:
    """Delay after round ``attempt`` (1-based) with ±10% jitter; the last entry repeats."""
    steps = schedule or DEFAULT_SCHEDULE
    base = steps[max(1, min(attempt, len(steps))) - 1]
    return max(0.0, base * random.uniform(0.9, 1.1))


class DeliveryRunner:
    def __init__(self, context: ServerContext, queue: Queue, state: ServerState) -> None:
        self.context = context
        self.queue = queue
        self.state = state
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        self._stopping = False
        queue.listeners.append(self.schedule)

    def reconfigure(self, context: ServerContext) -> None:
        self.context = context

    async def start(self) -> None:
        items = await asyncio.to_thread(self.queue.recover)
        if items:
            log.info("resuming %d queued item(s)", len(items))
        for item in items:
            self.schedule(item)

    def schedule_id(self, qid: str) -> None:
        """Schedule an item another process (a reception worker) wrote."""
        if qid and qid not in self.tasks:
            try:
                self.schedule(self.queue.load(qid))
            except QueueError as exc:
                log.error("qid=%s: cannot load item from a worker: %s", qid, exc)

    def schedule(self, item: QueueItem) -> None:
        if self._stopping or item.id in self.tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(item), name=f"qid={item.id}")
        self.tasks[item.id] = task
        task.add_done_callback(functools.partial(self._forget, item.id))

    def _forget(self, qid: str, _task: asyncio.Task[None] | None = None) -> None:
        self.tasks.pop(qid, None)
        self.wakeups.pop(qid, None)

    def handle_requests(self) -> None:
        """Serve ``tampu queue retry|delete`` (SIGUSR1): new items, removed ones, retries."""
        self.rescan()
        for qid, event in list(self.wakeups.items()):
            if not self.queue.item_path(qid).exists():
                event.set()  # deleted by an operator: the task notices and ends now
        for name in self.queue.take_retry_requests():
            woke = self.retry_now(None if name == "all" else name)
            log.info("retry requested for %s: %d waiting item(s) woken", name, woke)

    def retry_now(self, qid: str | None = None) -> int:
        """Wake the items (all, or one) that wait for a retry. Returns how many woke."""
        woken = 0
        for key, event in list(self.wakeups.items()):
            if qid is None or key == qid:
                event.set()
                woken += 1
        return woken

    def rescan(self) -> int:
        """Pick up items written by other processes (workers, ``tampu queue``)."""
        n = 0
        for qid in self.queue.ids():
            if qid not in self.tasks:
                try:
                    item = self.queue.load(qid)
                except QueueError as exc:
                    if self.queue.item_path(qid).exists():  # else: finished meanwhile
                        self.queue.quarantine(qid, str(exc))
                    continue
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

    async def _run(self, item: QueueItem) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._deliver_item(item)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                delay = schedule_delay(self.context.config.server.retry_schedule, failures)
                log.exception("qid=%s: delivery task failed; trying again in %.0fs", item.id,
                              delay)
                await asyncio.sleep(delay)

    async def _deliver_item(self, item: QueueItem) -> None:
        settings = self.context.config.server
        while True:
            message, item._data = item._data, None  # a new item's bytes come from reception
            if message is None:
                if not self.queue.item_path(item.id).exists():
                    log.info("qid=%s removed from the queue by an operator", item.id)
                    await self.queue.remove(item)  # a state file written meanwhile
                    return
                # an OSError here ends in _run, which logs it and tries again later
                message = await asyncio.to_thread(self.queue.read_message, item.id)
            pending = item.pending
            for i, rcpt in enumerate(pending):
                # Each result is on disk before the next recipient. After the last one the
                # round's end writes it, or the item is removed: a crash in between only
                # means delivering that recipient again (twice is allowed, never zero times).
                await self._attempt(item, rcpt, message, persist=i < len(pending) - 1)
            item.attempts += 1
            expired = time.time() - item.created >= settings.give_up_after
            if not item.pending or expired:
                await self._finish(item, message, expired)
                return
            await self.queue.save_state(item)
            delay = None
            try:
                delay = await self.context.hooks.retry_delay(item, item.attempts)  # type: ignore[union-attr]
            except PluginError:
                pass
            if delay is None:
                delay = schedule_delay(settings.retry_schedule, item.attempts)
            remaining = item.created + settings.give_up_after - time.time()
            delay = max(0.0, min(delay, remaining))
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

    async def _attempt(self, item: QueueItem, rcpt: Recipient, message: bytes,
                       persist: bool = True) -> None:
        hooks = self.context.hooks
        assert hooks is not None
        start = time.monotonic()
        try:
            result = await hooks.deliver(item, rcpt, message)
        except PluginError as exc:
            result = DeliveryResult.temporary(f"delivery plugin {exc.plugin} failed: "
                                              f"{exc.reason}")
        if result is None:
            result = DeliveryResult.permanent("no delivery backend accepts this recipient")
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
            await self.queue.save_state(item)
        log.info("qid=%s from=<%s> to=<%s> attempt=%d status=%s remote=%s delay=%.3fs reply=%r",
                 item.id, item.mail_from, rcpt.address, rcpt.attempts, result.status,
                 result.remote or "-", time.monotonic() - start, result.text)
        await hooks.delivery_attempted(item, rcpt, result)

    async def _finish(self, item: QueueItem, message: bytes, expired: bool) -> None:
        hooks = self.context.hooks
        assert hooks is not None
        if expired and item.pending:
            timed_out = item.pending
            for rcpt in timed_out:
                rcpt.status = RecipientStatus.FAILED
                rcpt.last_error = rcpt.last_error or "no delivery attempt succeeded"
            item.extra["timed_out"] = [r.address for r in timed_out]
            await self.queue.save_state(item)
            log.info("qid=%s: giving up after %.0fs on %s", item.id,
                     self.context.config.server.give_up_after,
                     ",".join(f"<{r.address}>" for r in timed_out))
        failed = item.failed
        if failed:
            await hooks.queue_give_up(item, failed)
            if item.mail_from:
                await self._send_dsn(item, failed, message)
            else:
                log.info("qid=%s: %d recipient(s) failed; no DSN for the null sender", item.id,
                         len(failed))
        await self.queue.remove(item)
        log.info("qid=%s done: %d sent, %d failed", item.id,
                 sum(r.status is RecipientStatus.SENT for r in item.recipients), len(failed))
        await hooks.queue_done(item)

    async def _send_dsn(self, item: QueueItem, failed: list[Recipient], message: bytes) -> None:
        hooks = self.context.hooks
        assert hooks is not None
        try:
            dsn = await hooks.make_dsn(item, failed, message)
        except PluginError:
            dsn = None
        if dsn is None:
            log.warning("qid=%s: no plugin made a DSN for %d failed recipient(s)", item.id,
                        len(failed))
            return
        new = await self.queue.submit(mail_from="", recipients=[item.mail_from], data=dsn,
                                      origin="dsn", check_full=False,
                                      extra={"dsn_for": item.id})
        log.info("qid=%s: DSN queued as %s to <%s>", item.id, new.id, item.mail_from)
