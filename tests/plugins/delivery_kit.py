"""Helpers shared by the local delivery tests: send over SMTP, record results, (polling: the
test kit's ``tampu.testing.wait_for``)."""

from __future__ import annotations

from tampu import DeliveryResult, QueueItem, Recipient, hookimpl
from tampu.testing import RunningServer, wait_for


def send(srv: RunningServer, mail_from: str, rcpts: list[str], body: bytes) -> str:
    """Send one message over the smtp listener; returns its queue ID."""
    with srv.smtp() as client:
        client.ehlo()
        code, msg = client.mail(mail_from)
        assert code == 250, msg
        for rcpt in rcpts:
            code, msg = client.rcpt(rcpt)
            assert code == 250, (rcpt, msg)
        code, msg = client.data(body)
        assert code == 250, msg
    return msg.decode().rsplit(" ", 1)[-1]


def load(srv: RunningServer, qid: str) -> QueueItem | None:
    """The queue item as on disk now, or None when it left the queue."""
    if qid not in srv.queue_items():
        return None
    try:
        return srv.store.load_now(qid)
    except Exception:  # removed between the listing and the read
        return None


def recipient(item: QueueItem, address: str) -> Recipient:
    return next(r for r in item.recipients if r.address == address)


class Recorder:
    """A test plugin that records every delivery attempt."""

    name = "recorder"

    def __init__(self) -> None:
        self.results: list[tuple[str, str, DeliveryResult]] = []

    @hookimpl
    def delivery_attempted(self, item: QueueItem, recipient: Recipient,
                           result: DeliveryResult) -> None:
        self.results.append((item.id, recipient.address, result))

    def for_address(self, address: str) -> list[DeliveryResult]:
        return [r for _, a, r in list(self.results) if a == address]

    def first(self, address: str, timeout: float = 10.0) -> DeliveryResult:
        return wait_for(lambda: self.for_address(address), timeout,
                        f"a delivery attempt for {address}")[0]
