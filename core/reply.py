"""SMTP replies as values: plugins return them, the core sends them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: basic code, enhanced status code (RFC 3463) and text.

    ``status`` may be empty for replies that carry no enhanced code (greeting, EHLO).
    """

    code: int
    status: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.status and self.status[0] != str(self.code)[0]:
            raise ValueError(f"enhanced status {self.status} does not match code {self.code}")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The reply as wire lines (without CRLF); multi-line text gives continuation lines."""
        texts = self.text.splitlines() or [""]
        prefix = f"{self.status} " if self.status else ""
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{text}")
        return out

    def __str__(self) -> str:
        return "\r\n".join(self.lines())


# Named replies shared by the core, the plugins and the tests.
OK: Final = Reply(250, "2.0.0", "OK")
SENDER_OK: Final = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK: Final = Reply(250, "2.1.5", "Recipient OK")
UNKNOWN_RECIPIENT: Final = Reply(550, "5.1.1", "Unknown recipient")
RELAY_DENIED: Final = Reply(550, "5.7.1", "Relaying not permitted; authenticate first")
AUTH_REQUIRED: Final = Reply(530, "5.7.0", "Authentication required")
AUTH_OK: Final = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID: Final = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPFAIL: Final = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
ENCRYPTION_REQUIRED: Final = Reply(538, "5.7.11", "Encryption required for authentication")
TOO_MANY_RECIPIENTS: Final = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG: Final = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_TOO_LONG: Final = Reply(500, "5.5.2", "Line too long")
PLUGIN_FAILED: Final = Reply(451, "4.3.0", "Local error in processing, try again later")
QUEUE_FULL: Final = Reply(452, "4.3.1", "Queue full, try again later")
QUEUE_WRITE_FAILED: Final = Reply(451, "4.3.0", "Could not queue the message, try again later")
TOO_MANY_CONNECTIONS: Final = Reply(421, "4.7.0", "Too many connections, try again later")
SHUTTING_DOWN: Final = Reply(421, "4.3.2", "Server shutting down, try again later")
TOO_MANY_ERRORS: Final = Reply(421, "4.7.0", "Too many unrecognized commands, goodbye")
LOOP_DETECTED: Final = Reply(554, "5.4.6", "Loop detected: too many Received headers")
