"""One delivery round of a queue item: one attempt at every pending recipient.

The core's relay guard runs first (:func:`relay_refusal`: no backend can skip it), then the
delivery backends in order (``deliver_batch`` for the recipients still unclaimed, ``deliver``
per recipient); each result is written to the item's state before the next backend is asked,
logged, and told to ``delivery_attempted``. A recipient no backend claims fails
(:data:`NO_BACKEND`). When and how often rounds run is :mod:`tampu.delivery`'s; what follows
a round (retries, DSNs, the end of the item) is :mod:`tampu.delivery_outcome`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tampu.addresses import domain_of
from tampu.caller import DeliveryStage
from tampu.errors import PluginError
from tampu.item import DeliveryResult, QueueItem, Recipient, RecipientStatus
from tampu.state import ServerState

log = logging.getLogger("tampu.delivery")  # one logger for the delivery loop's lines

NO_BACKEND = "no delivery backend accepts this recipient"


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


async def deliver_round(state: ServerState, item: QueueItem,
                        message: bytes) -> list[Recipient]:
    """One attempt at every pending recipient; the recipients sent."""
    runtime = state.runtime
    pending = item.pending
    unclaimed: list[Recipient] = []
    refused: list[tuple[Recipient, DeliveryResult]] = []
    for rcpt in pending:
        refusal = relay_refusal(runtime.context.is_local_domain, item, rcpt)
        if refusal is None:
            unclaimed.append(rcpt)
        else:
            refused.append((rcpt, refusal))
    if refused:
        await _record(state, item, refused, "core", time.monotonic())
    stages = runtime.hooks.delivery_stages()
    for index, stage in enumerate(stages):
        if not unclaimed:
            break
        last = index == len(stages) - 1
        if stage.batch:
            unclaimed = await _batch(state, item, stage, unclaimed, message)
        else:
            unclaimed = await _singles(state, item, stage, unclaimed, message, last)
    for rcpt in unclaimed:  # also when no backend is configured at all
        await _record(state, item, [(rcpt, DeliveryResult.permanent(NO_BACKEND))], "core",
                      time.monotonic())
    return [r for r in pending if r.status is RecipientStatus.SENT]


async def _singles(state: ServerState, item: QueueItem, stage: DeliveryStage,
                   rcpts: list[Recipient], message: bytes, last: bool) -> list[Recipient]:
    """``deliver`` per recipient; the recipients no backend of the stage claimed."""
    hooks = state.runtime.hooks
    left = []
    for rcpt in rcpts:
        start = time.monotonic()
        try:
            result, plugin = await hooks.deliver_in(stage, item, rcpt, message)
            backend = plugin or "core"
        except PluginError as exc:
            backend = exc.plugin
            result = DeliveryResult.temporary(f"delivery plugin {exc.plugin} failed: "
                                              f"{exc.reason}")
        if result is None and last:
            result = DeliveryResult.permanent(NO_BACKEND)
        if result is None:
            left.append(rcpt)
        else:
            await _record(state, item, [(rcpt, result)], backend, start)
    return left


async def _batch(state: ServerState, item: QueueItem, stage: DeliveryStage,
                 rcpts: list[Recipient], message: bytes) -> list[Recipient]:
    """One backend's ``deliver_batch``; the recipients it did not answer for."""
    start = time.monotonic()
    try:
        pairs = await state.runtime.hooks.deliver_batch(stage, item, rcpts, message)
    except PluginError as exc:
        failure = DeliveryResult.temporary(f"delivery plugin {exc.plugin} failed: "
                                           f"{exc.reason}")
        await _record(state, item, [(r, failure) for r in rcpts], exc.plugin, start)
        return []
    if not pairs:
        return rcpts
    await _record(state, item, pairs, stage.plugins[0], start)
    answered = {id(r) for r, _ in pairs}
    return [r for r in rcpts if id(r) not in answered]


async def _record(state: ServerState, item: QueueItem,
                  results: list[tuple[Recipient, DeliveryResult]], backend: str,
                  start: float) -> None:
    """Apply results, write them (unless the item is about to finish: nothing pending
    left; a crash then only means delivering again, twice is allowed, never zero
    times), log them and fire ``delivery_attempted``."""
    for rcpt, result in results:
        rcpt.attempts += 1
        rcpt.last_error = "" if result.status == "sent" else result.text
        rcpt.last_code = result.code
        rcpt.last_enhanced = result.enhanced
        rcpt.last_remote = result.remote
        if result.status == "sent":
            rcpt.status = RecipientStatus.SENT
        elif result.status == "permanent":
            rcpt.status = RecipientStatus.FAILED
    if item.pending:
        await state.runtime.store.save_state(item)
    hooks = state.runtime.hooks
    elapsed = time.monotonic() - start
    for rcpt, result in results:
        log.info("qid=%s from=<%s> to=<%s> attempt=%d status=%s backend=%s remote=%s "
                 "delay=%.3fs reply=%r", item.id, item.mail_from, rcpt.address,
                 rcpt.attempts, result.status, backend, result.remote or "-", elapsed,
                 result.text)
        await hooks.delivery_attempted(item, rcpt, result, backend)
