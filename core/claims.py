"""The claim loop: how a node takes its share of a shared queue (:class:`SharedQueueStore`).

With the filesystem store the delivery runner owns every item of its queue. With a shared
store, items belong to nobody until a node claims them: this loop claims due items (as many as
the store's ``max_in_flight`` and the runner's slots allow), hands each to the runner's
``schedule`` as if it had just been received, and releases the item's lease when its delivery
task ends. The task ends after one round (the runner's ``hand_back``): an item's next attempt
is due for any node, it does not wait on this one. Items this node receives itself are leased
at ``put`` and delivered at once with their bytes in memory; the loop only attaches the
release to their tasks.

A node that dies releases nothing: its leases expire (``lease_seconds``) and the items become
due again for every node. A duplicate delivery is possible only for an attempt that was in
flight when the node died (or lost the database for longer than a lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from tampu.backends import SharedQueueStore
from tampu.errors import QueueError
from tampu.item import QueueItem

if TYPE_CHECKING:
    from tampu.delivery import DeliveryRunner
    from tampu.intake import Intake
    from tampu.state import ServerState

log = logging.getLogger("tampu.claims")

class ClaimLoop:
    """Feeds ``runner`` with the items this node claims from ``store``."""

    def __init__(self, state: ServerState, runner: DeliveryRunner, intake: Intake,
                 store: SharedQueueStore) -> None:
        self.state = state
        self.runner = runner
        self.intake = intake
        self.store = store
        self.batch = store.claim_batch
        self.max_in_flight = store.max_in_flight
        self.poll = store.poll_interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.store.lease_on_put = True
        self.runner.hand_back = True  # rounds end the task; the next one is claimed anew
        self.intake.schedulers.append(self._adopt)  # after the runner's own scheduler
        self._task = asyncio.get_running_loop().create_task(self._run(), name="claims")

    @property
    def capacity(self) -> int:
        """Items delivering or waiting for a delivery slot here: ``max_in_flight``, and no
        more than the runner's slots (``[server] max_deliveries``) plus one batch, so that
        what this node cannot start soon stays claimable by the others."""
        return min(self.max_in_flight, self.runner.slots.limit + self.batch)

    async def stop(self) -> None:
        self.store.lease_on_put = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ------------------------------------------------------------------ leases

    def _release_when_done(self, qid: str) -> None:
        task = self.runner.tasks.get(qid)
        if task is None:  # not scheduled (stopping, or already running here): give it back
            self.state.spawn(self._release(qid))
            return
        task.add_done_callback(lambda _t: self.state.spawn(self._release(qid)))

    async def _release(self, qid: str) -> None:
        try:
            await self.store.release(qid)
        except QueueError as exc:
            log.warning("qid=%s: lease not released (it expires): %s", qid, exc)

    def _adopt(self, item: QueueItem, _message: bytes) -> None:
        """An item this process just stored (leased at put): release it when delivered."""
        if self.store.lease_on_put:
            self._release_when_done(item.id)

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while not self.state.stopping:
            try:
                more = await self._claim_once()
            except QueueError as exc:
                log.error("cannot claim queue items: %s", exc)
                more = False
            except Exception:  # the loop must survive anything
                log.exception("claim loop failed; going on")
                more = False
            if not more:
                await self.store.wait_due(self.poll)

    async def _claim_once(self) -> bool:
        """Claim and schedule one batch. True if there may be more due right now."""
        free = self.capacity - len(self.runner.tasks)
        if free <= 0:
            return False
        limit = min(self.batch, free)
        ids = await self.store.claim(limit)
        for qid in ids:
            if qid in self.runner.tasks:  # a task of ours still finishing with it
                self._release_when_done(qid)
                continue
            try:
                item = await self.store.load(qid)
            except QueueError as exc:
                if await self.store.exists(qid):
                    await self.store.quarantine(qid, str(exc))
                await self._release(qid)
                continue
            if item.held:  # held between the claim and the load
                await self._release(qid)
                continue
            self.runner.schedule(item)
            self._release_when_done(qid)
        return len(ids) == limit


def start_claims(state: ServerState, runner: DeliveryRunner, intake: Intake
                 ) -> ClaimLoop | None:
    """A claim loop for a shared store (started), None for a store the runner owns."""
    store = state.runtime.store
    if not isinstance(store, SharedQueueStore):
        return None
    claims = ClaimLoop(state, runner, intake, store)
    claims.start()
    return claims
