"""Intake: how a message becomes a queue item. The SMTP layer, DSNs and ``tampu sendmail``
all come through here:

    expand recipients (queue_expand_recipient) -> add headers (queue_add_headers: DKIM)
      -> store.put (durable) -> queue_enqueued -> schedule delivery

and the caller gets the item (its ID goes into the ``250``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tampu.envelope import Envelope
from tampu.errors import QueueFull
from tampu.item import DEFAULT_NOTIFY, Notify, Origin, QueueItem, Recipient
from tampu.state import ServerState

log = logging.getLogger("tampu.intake")

Scheduler = Callable[[QueueItem, bytes], object]
"""Called with a new item and its bytes; what it returns is ignored."""
_NOTIFY_WORDS: tuple[Literal["SUCCESS", "FAILURE", "DELAY"], ...] = ("SUCCESS", "FAILURE", "DELAY")


@dataclass(frozen=True, slots=True)
class Submission:
    """A message to queue: the envelope as accepted and the bytes."""

    mail_from: str
    recipients: list[str]
    data: bytes
    envelope: Envelope | None = None
    """The SMTP transaction (None for mail the server makes)."""
    auth_user: str | None = None
    trusted_network: bool = False
    origin: Origin = "smtp"
    peer: str = ""
    helo: str = ""
    item_id: str | None = None
    extra: dict[str, object] | None = None


def parse_notify(value: str | bool | None) -> Notify | None:
    """RCPT TO's NOTIFY parameter (RFC 3461 4.1): NEVER, or SUCCESS/FAILURE/DELAY."""
    if not isinstance(value, str):
        return None
    words = {w.strip().upper() for w in value.split(",")}
    return frozenset(word for word in _NOTIFY_WORDS if word in words)


class Intake:
    """Turns submissions into durable queue items and hands them to delivery."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.schedulers: list[Scheduler] = []
        """Called with each new item and its bytes once it is durable (delivery, workers)."""
        self.in_hand: set[str] = set()
        """Items from being stored until they are handed to the schedulers. A listing of the
        queue meanwhile (the recovery at start, a rescan) leaves them to this intake: were
        the listing's copy delivered first, the intake's hand-off would deliver it again."""

    async def submit(self, sub: Submission, *, check_full: bool = True) -> QueueItem:
        """Expand, sign, store durably, notify, schedule. Raises QueueFull, QueueError,
        OSError or PluginError; nothing is stored then."""
        runtime = self.state.runtime
        store, hooks = runtime.store, runtime.hooks
        if check_full and store.full():
            raise QueueFull(f"queue holds {store.max_items} items")
        env = sub.envelope
        params = env.mail_params if env is not None else {}
        ret = str(params.get("RET", "")).upper()
        item = QueueItem(
            id=sub.item_id or store.new_id(), mail_from=sub.mail_from, recipients=[],
            auth_user=sub.auth_user, trusted_network=sub.trusted_network, origin=sub.origin,
            peer=sub.peer, helo=sub.helo,
            smtputf8=bool(env.smtputf8) if env is not None else False,
            dsn_ret="FULL" if ret == "FULL" else "HDRS" if ret == "HDRS" else None,
            dsn_envid=str(params.get("ENVID", "")) if isinstance(params.get("ENVID"), str)
            else "", extra=dict(sub.extra or {}))
        seen: set[str] = set()
        for i, address in enumerate(sub.recipients):
            rparams = env.rcpt_params[i] if env is not None and i < len(env.rcpt_params) \
                else {}
            notify = parse_notify(rparams.get("NOTIFY"))
            orcpt = rparams.get("ORCPT")
            expanded, _plugin = await hooks.queue_expand_recipient(env, item, address)
            for final in expanded if expanded is not None else [Recipient(address, address)]:
                if final.key in seen:
                    continue
                seen.add(final.key)
                final.notify = notify if notify is not None else final.notify
                final.orcpt = orcpt if isinstance(orcpt, str) else final.orcpt
                item.recipients.append(final)
        if not item.recipients:
            log.info("qid=%s has no recipients after expansion; dropped", item.id)
        data = sub.data
        added = await hooks.queue_add_headers(item, data)
        if added:
            data = b"".join(f"{n}: {v}\r\n".encode("utf-8", "surrogateescape")
                            for n, v in added) + data
        self.in_hand.add(item.id)
        try:
            await store.put(item, data)
            await hooks.queue_enqueued(item)
            for schedule in self.schedulers:
                schedule(item, data)
        finally:
            self.in_hand.discard(item.id)
        return item


def wants(rcpt: Recipient, what: str) -> bool:
    """Whether ``rcpt`` asked for a DSN on ``what`` (SUCCESS, FAILURE, DELAY)."""
    notify = rcpt.notify if rcpt.notify is not None else DEFAULT_NOTIFY
    return what in notify
