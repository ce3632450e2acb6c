"""Queue items and delivery results: what the queue stores and the delivery hooks exchange."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tampu.envelope import Stash


class RecipientStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """What a delivery backend says about one attempt for one recipient.

    ``status``: ``sent``; ``temporary`` (retry later); ``permanent`` (give up, DSN).
    ``code``/``enhanced``/``text`` carry the remote's reply when there was one, so the DSN
    can quote it as Diagnostic-Code.
    """

    status: str
    text: str = ""
    code: int | None = None
    enhanced: str = ""
    remote: str = ""
    """Who answered (``mx.example.com [192.0.2.1]``, ``maildir``, ``mda``), for logs and DSNs."""

    def __post_init__(self) -> None:
        if self.status not in ("sent", "temporary", "permanent"):
            raise ValueError(f"bad delivery status {self.status!r}")

    @classmethod
    def sent(cls, text: str = "delivered", **kw: Any) -> DeliveryResult:
        return cls("sent", text, **kw)

    @classmethod
    def temporary(cls, text: str, **kw: Any) -> DeliveryResult:
        return cls("temporary", text, **kw)

    @classmethod
    def permanent(cls, text: str, **kw: Any) -> DeliveryResult:
        return cls("permanent", text, **kw)

    @property
    def is_final(self) -> bool:
        return self.status != "temporary"


@dataclass(eq=False)
class Recipient:
    """One final recipient of a queue item and where its delivery stands."""

    address: str
    original: str
    """The address as given in RCPT TO, before alias expansion."""
    route: dict[str, Any] = field(default_factory=dict)
    """Hints for delivery set at expansion, e.g. ``{"pipe": "cmd"}``, ``{"via": [...]}``."""
    status: RecipientStatus = RecipientStatus.PENDING
    attempts: int = 0
    last_error: str = ""
    last_code: int | None = None
    last_enhanced: str = ""
    last_remote: str = ""

    @property
    def pending(self) -> bool:
        return self.status is RecipientStatus.PENDING

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "original": self.original,
            "route": self.route,
            "status": self.status.value,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "last_code": self.last_code,
            "last_enhanced": self.last_enhanced,
            "last_remote": self.last_remote,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipient:
        return cls(
            address=data["address"],
            original=data.get("original", data["address"]),
            route=dict(data.get("route") or {}),
            status=RecipientStatus(data.get("status", "pending")),
            attempts=int(data.get("attempts", 0)),
            last_error=data.get("last_error", ""),
            last_code=data.get("last_code"),
            last_enhanced=data.get("last_enhanced", ""),
            last_remote=data.get("last_remote", ""),
        )


@dataclass(eq=False)
class QueueItem:
    """A message in the queue: envelope, per-recipient state and where the bytes are."""

    id: str
    mail_from: str
    recipients: list[Recipient]
    created: float = field(default_factory=time.time)
    auth_user: str | None = None
    """Who submitted it (authenticated sessions); None for mail from the outside."""
    origin: str = "smtp"
    """``smtp`` for received mail, ``dsn`` or ``forward`` for mail the server made itself."""
    peer: str = ""
    helo: str = ""
    smtputf8: bool = False
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """Plugin data that must survive restarts (JSON-serialisable)."""
    stash: Stash = field(default_factory=Stash)
    _data: bytes | None = None

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.pending]

    @property
    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status is RecipientStatus.FAILED]

    @property
    def trusted_origin(self) -> bool:
        """Mail from an authenticated user or made by the server: may go to remote domains."""
        return self.auth_user is not None or self.origin in ("dsn", "forward")

    def header_json(self) -> dict[str, Any]:
        return {
            "v": 1,
            "id": self.id,
            "mail_from": self.mail_from,
            "recipients": [r.to_json() for r in self.recipients],
            "created": self.created,
            "auth_user": self.auth_user,
            "origin": self.origin,
            "peer": self.peer,
            "helo": self.helo,
            "smtputf8": self.smtputf8,
            "extra": self.extra,
        }

    def state_json(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "recipients": [r.to_json() for r in self.recipients],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueItem:
        return cls(
            id=data["id"],
            mail_from=data["mail_from"],
            recipients=[Recipient.from_json(r) for r in data["recipients"]],
            created=float(data["created"]),
            auth_user=data.get("auth_user"),
            origin=data.get("origin", "smtp"),
            peer=data.get("peer", ""),
            helo=data.get("helo", ""),
            smtputf8=bool(data.get("smtputf8", False)),
            extra=dict(data.get("extra") or {}),
        )

    def apply_state(self, state: dict[str, Any]) -> None:
        self.attempts = int(state.get("attempts", 0))
        by_addr = {r["address"]: r for r in state.get("recipients", [])}
        for rcpt in self.recipients:
            saved = by_addr.get(rcpt.address)
            if saved is not None:
                fresh = Recipient.from_json(saved)
                rcpt.status = fresh.status
                rcpt.attempts = fresh.attempts
                rcpt.last_error = fresh.last_error
                rcpt.last_code = fresh.last_code
                rcpt.last_enhanced = fresh.last_enhanced
                rcpt.last_remote = fresh.last_remote
