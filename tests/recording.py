"""A controllable delivery backend for queue/delivery tests, passed as ``plugins=[Recorder()]``.

The outcome of each attempt is chosen per recipient address: ``outcomes[address]`` is a list
of DeliveryResult (one per attempt, the last repeats), ``None`` (claim nothing) or an exception
instance (the backend crashes). Unlisted addresses are delivered. The server runs in another
thread: use the ``wait_*`` helpers, which poll with a deadline.
"""

from __future__ import annotations

import email
import email.policy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from tampu import DeliveryResult, QueueItem, Recipient, hookimpl
from tampu.reply import RECIPIENT_OK


@dataclass
class Delivery:
    qid: str
    mail_from: str
    address: str
    origin: str
    message: bytes
    at: float

    def parsed(self) -> EmailMessage:
        msg = email.message_from_bytes(self.message, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


class Recorder:
    """Accepts every RCPT, delivers per ``outcomes``, records attempts, deliveries, items."""

    name = "recorder"
    priority = 10

    def __init__(self, outcomes: dict[str, Any] | None = None, *,
                 retry_delay: float | None = None, accept_rcpt: bool = True,
                 default: Any = "sent", block: threading.Event | None = None) -> None:
        self.outcomes = dict(outcomes or {})
        self.default = default
        """Outcome of unlisted addresses: "sent", or None to leave them to other backends."""
        self.delay = retry_delay
        self.accept_rcpt = accept_rcpt
        self.lock = threading.Lock()
        self.attempts: list[tuple[str, str, str, float]] = []  # qid, address, status, time
        self.delivered: list[Delivery] = []
        self.enqueued: list[QueueItem] = []
        self.done: list[str] = []
        self.gave_up: list[tuple[str, list[str]]] = []
        self.block = block
        """While set and not yet released, each attempt waits for it (an attempt in flight)."""
        self.blocked = False

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def smtp_rcpt_to(self, session: Any, envelope: Any, address: str, params: Any) -> Any:
        return RECIPIENT_OK if self.accept_rcpt else None

    @hookimpl
    def queue_enqueued(self, item: QueueItem) -> None:
        with self.lock:
            self.enqueued.append(item)

    @hookimpl
    def deliver(self, item: QueueItem, recipient: Recipient, message: bytes) -> Any:
        if self.block is not None and not self.block.is_set():
            return self._gated(item, recipient, message)
        return self._deliver(item, recipient, message)

    async def _gated(self, item: QueueItem, recipient: Recipient,
                     message: bytes) -> DeliveryResult | None:
        import asyncio

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
            result = DeliveryResult.sent(remote="recorder")
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
        found: list[Delivery] = []

        def check() -> bool:
            found[:] = [d for d in self.delivered if d.address == address
                        and (origin is None or d.origin == origin)]
            return bool(found)

        self.wait(check, timeout, f"a delivery to {address} (origin {origin})")
        return found[0]

    def wait_done(self, qid: str, timeout: float = 10) -> None:
        self.wait(lambda: qid in self.done, timeout, f"qid={qid} to leave the queue")

    def attempts_for(self, address: str) -> list[str]:
        with self.lock:
            return [status for _, a, status, _ in self.attempts if a == address]

    def dsns(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.delivered if d.origin == "dsn"]


def send(srv: Any, mail_from: str, rcpts: list[str], subject: str = "test",
         body: str = "hello\r\n", headers: str = "") -> str:
    """Send one message over SMTP; returns the queue ID from the 250 reply."""
    data = (f"From: <{mail_from or 'nobody@example.org'}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@client.test>\r\n{headers}\r\n{body}")
    with srv.smtp() as c:
        c.ehlo()
        code, msg = c.mail(mail_from or "<>")
        assert code == 250, msg
        for r in rcpts:
            code, msg = c.rcpt(r)
            assert code == 250, msg
        code, msg = c.data(data.encode())
        assert code == 250, msg
    return msg.decode().rpartition(" ")[2]


def fixed_port(host: str = "127.0.0.1") -> int:
    """A free port below the ephemeral range, for a server that restarts on the same port.

    An ephemeral port may be taken by some client's source port while the server is down
    (even by a client connecting to itself: TCP simultaneous open), and the restart fails.
    """
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")
