"""What follows a delivery round: the wait before the next one, delay warnings, and the end
of a queue item.

While some recipients are pending the item waits per the retry schedule (``retry_delay``
hook, else ``[server] retry_schedule`` with jitter: :func:`schedule_delay`). When none are
pending, or the item is older than ``give_up_after``, the item is finished (:func:`finish`):
failed recipients go to ``queue_give_up`` and, unless they asked for NOTIFY=NEVER, into a DSN
(``make_dsn``, action ``failed``) queued from ``<>``; the item is removed and ``queue_done``
fired. Recipients that asked for NOTIFY=SUCCESS get a ``delivered`` DSN, those that asked for
NOTIFY=DELAY one ``delayed`` DSN after ``[server] delay_warning_after`` (:func:`notify`).

Retry schedule (chasquid's): 1 min, then 5, 10, 20 min, then every 20 min, each with ±10%
jitter.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Final

from tampu.errors import PluginError
from tampu.intake import Intake, Submission, wants
from tampu.item import QueueItem, Recipient, RecipientStatus
from tampu.state import ServerState

log = logging.getLogger("tampu.delivery")  # one logger for the delivery loop's lines

DEFAULT_SCHEDULE: Final = (60.0, 300.0, 600.0, 1200.0)
"""chasquid's: 1, 5, 10, 20 minutes, then every 20 minutes."""


def schedule_delay(schedule: list[float], attempt: int) -> float:
    """Delay after round ``attempt`` (1-based) with ±10% jitter; the last entry repeats."""
    steps = schedule or DEFAULT_SCHEDULE
    base = steps[max(1, min(attempt, len(steps))) - 1]
    return max(0.0, base * random.uniform(0.9, 1.1))


async def next_delay(state: ServerState, item: QueueItem, *, at_once: bool) -> float:
    """Seconds until the item's next round (none when ``at_once``: an operator asked for a
    retry), never past ``give_up_after``."""
    settings = state.runtime.config.server
    delay = None
    if at_once:
        delay = 0.0
    else:
        try:
            delay = await state.runtime.hooks.retry_delay(item, item.attempts)
        except PluginError:
            pass
    if delay is None:
        delay = schedule_delay(settings.retry_schedule, item.attempts)
    remaining = item.created + settings.give_up_after - time.time()
    return max(0.0, min(delay, remaining))


async def warn_delay(state: ServerState, intake: Intake, item: QueueItem,
                     message: bytes) -> None:
    """The ``delayed`` DSN, once per recipient that asked for it, after
    ``[server] delay_warning_after``."""
    after = state.runtime.config.server.delay_warning_after
    if not after or time.time() - item.created < after:
        return
    late = [r for r in item.pending if not r.delay_notified and wants(r, "DELAY")]
    for rcpt in late:
        rcpt.delay_notified = True
    await notify(state, intake, item, late, message, "delayed")


async def finish(state: ServerState, intake: Intake, item: QueueItem, message: bytes,
                 expired: bool) -> None:
    """The end of an item: give up on what is still pending when ``expired``, tell
    ``queue_give_up`` and the sender (``failed`` DSN) of the failures, remove the item,
    ``queue_done``."""
    runtime = state.runtime
    if expired and item.pending:
        timed_out = item.pending
        for rcpt in timed_out:
            rcpt.status = RecipientStatus.FAILED
            rcpt.last_error = rcpt.last_error or "no delivery attempt succeeded"
        item.extra["timed_out"] = [r.address for r in timed_out]
        await state.runtime.store.save_state(item)
        log.info("qid=%s: giving up after %.0fs on %s", item.id,
                 runtime.config.server.give_up_after,
                 ",".join(f"<{r.address}>" for r in timed_out))
    failed = item.failed
    if failed:
        await runtime.hooks.queue_give_up(item, failed)
        await notify(state, intake, item, [r for r in failed if wants(r, "FAILURE")], message,
                     "failed")
    await state.runtime.store.remove(item)
    if log.isEnabledFor(logging.DEBUG):  # at info, one line per delivery says it all
        log.debug("qid=%s done: %d sent, %d failed", item.id,
                  sum(r.status is RecipientStatus.SENT for r in item.recipients),
                  len(failed))
    await runtime.hooks.queue_done(item)


async def notify(state: ServerState, intake: Intake, item: QueueItem, rcpts: list[Recipient],
                 message: bytes, action: str) -> None:
    """Queue a DSN (``failed``, ``delayed``, ``delivered``) to the sender, if any."""
    if not rcpts:
        return
    if not item.mail_from:
        log.info("qid=%s: %d recipient(s) %s; no DSN for the null sender", item.id,
                 len(rcpts), action)
        return
    try:
        dsn = await state.runtime.hooks.make_dsn(item, rcpts, message, action)
    except PluginError:
        dsn = None
    if dsn is None:
        log.warning("qid=%s: no plugin made a %s DSN for %d recipient(s)", item.id,
                    action, len(rcpts))
        return
    new = await intake.submit(Submission(mail_from="", recipients=[item.mail_from],
                                         data=dsn, origin="dsn"), check_full=False)
    log.info("qid=%s: %s DSN queued as %s to <%s>", item.id, action, new.id,
             item.mail_from)
