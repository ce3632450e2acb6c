"""SMTP replies as values: plugins return them, the core sends them."""

from __future__ import annotations

import re
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
TOO_MANY_ERRORS: Final = Reply(421, "4.7.0", "Too many errors, closing connection")
LOOP_DETECTED: Final = Reply(554, "5.4.6", "Loop detected: too many Received headers")


# Enhanced status codes for replies worded without one, e.g. aiosmtpd's (RFC 3463, RFC 2034).
_ENHANCED = {
    211: "2.0.0", 214: "2.0.0", 220: "2.0.0", 221: "2.0.0", 235: "2.7.0", 250: "2.0.0",
    251: "2.1.5", 252: "2.5.0", 421: "4.3.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1",
    454: "4.7.0", 455: "4.5.4", 500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1",
    504: "5.5.4", 530: "5.7.0", 534: "5.7.9", 535: "5.7.8", 538: "5.7.11", 550: "5.0.0",
    552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def with_enhanced_code(line: str) -> str:
    """One reply line with an enhanced status code (RFC 2034), added if it has none."""
    if line[:1] not in "245" or not line[:3].isdigit() or _HAS_ENHANCED.match(line):
        return line
    enhanced = _ENHANCED.get(int(line[:3]), f"{line[0]}.0.0")
    text = line[4:]
    if text.startswith("Error: "):
        text = text[7:]
    return f"{line[:3]}{line[3:4] or ' '}{enhanced} {text}"
