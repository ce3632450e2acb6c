"""Moved to the test kit: ``tampu.testing.capture`` (kept for the imports of in-flight tests).

``Recorder`` is the kit's CaptureBackend as these tests knew it: named ``recorder``, and
accepting every RCPT unless told otherwise.
"""

from __future__ import annotations

import threading
from typing import Any

from tampu.testing import send
from tampu.testing.capture import CaptureBackend, Delivery
from tampu.testing.mx import fixed_port

__all__ = ["Delivery", "Recorder", "fixed_port", "send"]


class Recorder(CaptureBackend):
    name = "recorder"

    def __init__(self, outcomes: dict[str, Any] | None = None, *,
                 retry_delay: float | None = None, accept_rcpt: bool = True,
                 default: Any = "sent", block: threading.Event | None = None) -> None:
        super().__init__(outcomes, retry_delay=retry_delay, accept_rcpt=accept_rcpt,
                         default=default, block=block)
