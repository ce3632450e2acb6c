"""The capture backend: a delivery backend that keeps what it delivers, and defers or fails
the recipients a test tells it to.

    srv = tampu_server(capture=True, users={"bob@example.test": "pw"})   # srv.capture
    srv.send("a@example.org", ["bob@example.test"]).assert_accepted()
    assert b"Subject:" in srv.capture.wait_delivered("bob@example.test").message

Outcomes are chosen per recipient address: ``outcomes[address]`` is a list of DeliveryResult
(one per attempt, the last repeats), ``None`` (claim nothing: other backends are asked) or an
exception instance (the backend crashes); ``defer()``, ``fail()`` and ``crash()`` set them.
Unlisted addresses get ``default`` ("sent", or None to leave them to other backends). The
server runs in another thread: use the ``wait_*`` helpers, which poll with a deadline.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from tampu._markers import hookimpl
from tampu.envelope import Envelope, Session
from tampu.item import DeliveryResult, QueueItem, Recipient
from tampu.reply import RECIPIENT_OK, Reply


@dataclass
class Delivery:
    """One message delivered to one recipient."""

    qid: str
    mail_from: str
    address: str
    origin: str
    """``smtp``, ``dsn`` or ``forward``: who queued the item."""
    message: bytes
    at: float

    def parsed(self) -> EmailMessage:
        msg = email.message_from_bytes(self.message, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


class CaptureBackend:
    """Delivers per ``outcomes``, recording attempts, deliveries and the queue's events."""

    name = "capture"
    distribution = "tampu.testing"

    def __init__(self, outcomes: dict[str, Any] | None = None, *,
                 retry_delay: float | None = None, accept_rcpt: bool = False,
                 default: Any = "sent", block: threading.Event | None = None,  # noqa: ANN401 - "sent" or None
                 priority: int = 10) -> None:
        self.outcomes = dict(outcomes or {})
        self.default = default
        """Outcome of unlisted addresses: "sent", or None to leave them to other backends."""
        self.delay = retry_delay
        """What ``retry_delay`` answers (seconds before the next attempt), None: no opinion."""
        self.accept_rcpt = accept_rcpt
        """Accept every RCPT TO (a catch-all, before the other reception plugins)."""
        self.priority = priority
        self.lock = threading.Lock()
        self.attempts: list[tuple[str, str, str, float]] = []  # qid, address, status, time
        self.delivered: list[Delivery] = []
        self.enqueued: list[QueueItem] = []
        self.done: list[str] = []
        self.gave_up: list[tuple[str, list[str]]] = []
        self.block = block
        """While set and not yet released, each attempt waits for it (an attempt in flight)."""
        self.blocked = False

    # ---------------------------------------------------------------- telling it

    def defer(self, address: str, times: int = 1, text: str = "try again later", *,
              code: int = 451, enhanced: str = "4.4.1") -> None:
        """The first ``times`` attempts to ``address`` fail temporarily; later ones succeed."""
        self.outcomes[address] = [DeliveryResult.temporary(text, code=code, enhanced=enhanced,
                                                           remote=self.name)] * times + \
            [DeliveryResult.sent(remote=self.name)]

    def fail(self, address: str, text: str = "no such mailbox", *, code: int = 550,
             enhanced: str = "5.1.1", after_deferrals: int = 0) -> None:
        """Attempts to ``address`` fail permanently (after ``after_deferrals`` deferrals):
        the sender gets a DSN if the dsn plugin is on."""
        self.outcomes[address] = [DeliveryResult.temporary(
            "try again later", code=451, enhanced="4.4.1", remote=self.name)] * \
            after_deferrals + [DeliveryResult.permanent(text, code=code, enhanced=enhanced,
                                                        remote=self.name)]

    def crash(self, address: str, error: BaseException | None = None) -> None:
        """The backend raises while delivering to ``address`` (the core makes it temporary)."""
        self.outcomes[address] = error or RuntimeError("capture backend told to crash")

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                     params: dict[str, str | bool]) -> Reply | None:
        return RECIPIENT_OK if self.accept_rcpt else None

    @hookimpl
    def queue_enqueued(self, item: QueueItem) -> None:
        with self.lock:
            self.enqueued.append(item)

    @hookimpl
    def deliver(self, item: QueueItem, recipient: Recipient, message: bytes) -> Any:  # noqa: ANN401 - a result, None or a coroutine of one
        if self.block is not None and not self.block.is_set():
            return self._gated(item, recipient, message)
        return self._deliver(item, recipient, message)

    async def _gated(self, item: QueueItem, recipient: Recipient,
                     message: bytes) -> DeliveryResult | None:
        assert self.block is not None
        self.blocked = True
        await asyncio.to_thread(self.block.wait, 10)
        return self._deliver(item, recipient, message)

    def _deliver(self, item: QueueItem, recipient: Recipient,
                 message: bytes) -> DeliveryResult | None:
        outcome = self.outcomes.get(recipient.address, self.default)
        if isinstance(outcome, BaseException):
            with self.lock:
                self.attempts.append((item.id, recipient.address, "crash", time.monotonic()))
            raise outcome
        if outcome is None:
            return None
        if outcome == "sent":
            result = DeliveryResult.sent(remote=self.name)
        else:
            results = list(outcome)
            result = results[min(recipient.attempts, len(results) - 1)]
        with self.lock:
            self.attempts.append((item.id, recipient.address, result.status, time.monotonic()))
            if result.status == "sent":
                self.delivered.append(Delivery(item.id, item.mail_from, recipient.address,
                                               item.origin, message, time.monotonic()))
        return result

    @hookimpl
    def retry_delay(self, item: QueueItem, attempt: int) -> float | None:
        return self.delay

    @hookimpl
    def queue_give_up(self, item: QueueItem, failed: list[Recipient]) -> None:
        with self.lock:
            self.gave_up.append((item.id, [r.address for r in failed]))

    @hookimpl
    def queue_done(self, item: QueueItem) -> None:
        with self.lock:
            self.done.append(item.id)

    # ---------------------------------------------------------------- for tests

    def wait(self, predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate():
                    return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what or predicate}")

    def wait_delivered(self, address: str, *, origin: str | None = None,
                       timeout: float = 10) -> Delivery:
        """The first delivery to ``address`` (of an item from ``origin``), waiting for it."""
        found: list[Delivery] = []

        def check() -> bool:
            found[:] = [d for d in self.delivered if d.address == address
                        and (origin is None or d.origin == origin)]
            return bool(found)

        self.wait(check, timeout, f"a delivery to {address} (origin {origin})")
        return found[0]

    def wait_done(self, qid: str, timeout: float = 10) -> None:
        """Until item ``qid`` left the queue (delivered, or given up)."""
        self.wait(lambda: qid in self.done, timeout, f"qid={qid} to leave the queue")

    def attempts_for(self, address: str) -> list[str]:
        """The status of each attempt to ``address``: ``sent``, ``temporary``, ``permanent``,
        ``crash``."""
        with self.lock:
            return [status for _, a, status, _ in self.attempts if a == address]

    def messages_for(self, address: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.delivered if d.address == address]

    def dsns(self) -> list[Delivery]:
        """The delivery status notifications delivered (items of origin ``dsn``)."""
        with self.lock:
            return [d for d in self.delivered if d.origin == "dsn"]
