"""Queue items and delivery results: what the store keeps and the delivery hooks exchange."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from tampu.envelope import Stash

Origin = Literal["smtp", "dsn", "forward", "local"]
"""``smtp``: received; ``dsn``/``forward``: made by the server; ``local``: sendmail."""


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

    status: Literal["sent", "temporary", "permanent"]
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


@dataclass(frozen=True, slots=True)
class Route:
    """How a final recipient is to be delivered, as alias expansion decided.

    The core's relay guard lets a recipient in a remote domain leave only when the item is
    trusted (authenticated, or made by the server) or its route is a ``forward`` or ``via``
    that the local configuration set up.
    """

    pipe: str | None = None
    """Run this command with the message on stdin (``user: | command``)."""
    via: tuple[str, ...] = ()
    """Send through these hosts instead of the MX (``user: addr via host1/host2``)."""
    forward: bool = False
    """A local address forwarded to a remote one by the configuration (aliases)."""
    mail_from: str | None = None
    """The envelope sender for this recipient (sender rewriting on forwards)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.pipe is not None:
            out["pipe"] = self.pipe
        if self.via:
            out["via"] = list(self.via)
        if self.forward:
            out["forward"] = True
        if self.mail_from is not None:
            out["mail_from"] = self.mail_from
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Route:
        data = data or {}
        pipe = data.get("pipe")
        sender = data.get("mail_from")
        return cls(pipe=str(pipe) if pipe is not None else None,
                   via=tuple(str(h) for h in data.get("via") or ()),
                   forward=bool(data.get("forward")),
                   mail_from=str(sender) if sender is not None else None)


NO_ROUTE = Route()

Notify = frozenset[Literal["SUCCESS", "FAILURE", "DELAY"]]
"""RFC 3461 NOTIFY: empty means NEVER."""
DEFAULT_NOTIFY: Notify = frozenset({"FAILURE"})
"""Without NOTIFY: a DSN on failure only (delay warnings only when asked for)."""


@dataclass(eq=False)
class Recipient:
    """One final recipient of a queue item and where its delivery stands."""

    address: str
    original: str
    """The address as given in RCPT TO, before alias expansion."""
    route: Route = NO_ROUTE
    notify: Notify | None = None
    """NOTIFY of RCPT TO (RFC 3461); None when the client gave none."""
    orcpt: str = ""
    """ORCPT of RCPT TO, as given (``rfc822;user@example.com``)."""
    status: RecipientStatus = RecipientStatus.PENDING
    attempts: int = 0
    last_error: str = ""
    last_code: int | None = None
    last_enhanced: str = ""
    last_remote: str = ""
    delay_notified: bool = False

    @property
    def pending(self) -> bool:
        return self.status is RecipientStatus.PENDING

    @property
    def key(self) -> str:
        """What tells two final recipients apart (address and route)."""
        return f"{self.address.lower()}\0{sorted(self.route.to_json().items())}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "address": self.address, "original": self.original, "route": self.route.to_json(),
            "status": self.status.value, "attempts": self.attempts,
            "last_error": self.last_error, "last_code": self.last_code,
            "last_enhanced": self.last_enhanced, "last_remote": self.last_remote,
        }
        if self.notify is not None:
            out["notify"] = sorted(self.notify)
        if self.orcpt:
            out["orcpt"] = self.orcpt
        if self.delay_notified:
            out["delay_notified"] = True
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipient:
        notify = data.get("notify")
        return cls(
            address=data["address"],
            original=data.get("original", data["address"]),
            route=Route.from_json(data.get("route")),
            notify=frozenset(notify) if notify is not None else None,
            orcpt=str(data.get("orcpt", "")),
            status=RecipientStatus(data.get("status", "pending")),
            attempts=int(data.get("attempts", 0)),
            last_error=data.get("last_error", ""),
            last_code=data.get("last_code"),
            last_enhanced=data.get("last_enhanced", ""),
            last_remote=data.get("last_remote", ""),
            delay_notified=bool(data.get("delay_notified", False)),
        )

    def apply(self, saved: Recipient) -> None:
        """Take the delivery state of ``saved`` (a state file read back)."""
        self.status, self.attempts = saved.status, saved.attempts
        self.last_error, self.last_code = saved.last_error, saved.last_code
        self.last_enhanced, self.last_remote = saved.last_enhanced, saved.last_remote
        self.delay_notified = saved.delay_notified


@dataclass(eq=False)
class QueueItem:
    """A message in the queue: envelope, per-recipient state and plugin data."""

    id: str
    mail_from: str
    recipients: list[Recipient]
    created: float = field(default_factory=time.time)
    auth_user: str | None = None
    """Who submitted it (authenticated sessions); None for mail from the outside."""
    trusted_network: bool = False
    """Received from a trusted network (relay's ``trusted_networks``): it may be relayed."""
    origin: Origin = "smtp"
    peer: str = ""
    helo: str = ""
    smtputf8: bool = False
    dsn_ret: Literal["FULL", "HDRS"] | None = None
    """RET of MAIL FROM (RFC 3461): what a DSN returns of the message."""
    dsn_envid: str = ""
    """ENVID of MAIL FROM (RFC 3461), as given (xtext)."""
    size: int = 0
    attempts: int = 0
    next_attempt: float = 0.0
    """When the next delivery round is due (time.time()); 0 for now."""
    held: bool = False
    """Put on hold by an operator (``tampu queue hold``): not delivered until released."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Plugin data that must survive restarts (JSON-serialisable)."""
    stash: Stash = field(default_factory=Stash)

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.pending]

    @property
    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status is RecipientStatus.FAILED]

    def header_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": 2, "id": self.id, "mail_from": self.mail_from,
            "recipients": [r.to_json() for r in self.recipients], "created": self.created,
            "auth_user": self.auth_user, "trusted_network": self.trusted_network,
            "origin": self.origin, "peer": self.peer,
            "helo": self.helo, "smtputf8": self.smtputf8, "extra": self.extra,
        }
        if self.dsn_ret is not None:
            out["dsn_ret"] = self.dsn_ret
        if self.dsn_envid:
            out["dsn_envid"] = self.dsn_envid
        return out

    def state_json(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "held": self.held, "extra": self.extra,
                "next_attempt": self.next_attempt,
                "recipients": [r.to_json() for r in self.recipients]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueueItem:
        ret = data.get("dsn_ret")
        return cls(
            id=data["id"], mail_from=data["mail_from"],
            recipients=[Recipient.from_json(r) for r in data["recipients"]],
            created=float(data["created"]), auth_user=data.get("auth_user"),
            trusted_network=bool(data.get("trusted_network", False)),
            origin=data.get("origin", "smtp"), peer=data.get("peer", ""),
            helo=data.get("helo", ""), smtputf8=bool(data.get("smtputf8", False)),
            dsn_ret=ret if ret in ("FULL", "HDRS") else None,
            dsn_envid=str(data.get("dsn_envid", "")), extra=dict(data.get("extra") or {}),
        )

    def apply_state(self, state: dict[str, Any]) -> None:
        """Take back what a state file recorded (recipients matched by address and route)."""
        self.attempts = int(state.get("attempts", 0))
        self.held = bool(state.get("held", False))
        self.next_attempt = float(state.get("next_attempt", 0.0))
        self.extra.update(state.get("extra") or {})
        saved = {r.key: r for r in map(Recipient.from_json, state.get("recipients", []))}
        for rcpt in self.recipients:
            found = saved.get(rcpt.key)
            if found is not None:
                rcpt.apply(found)
