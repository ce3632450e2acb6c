"""What plugins see of a connection (Session), a transaction (Envelope) and a message.

Each carries a typed ``stash`` where plugins keep their own state::

    SPF_RESULT = StashKey[SpfResult]()
    session.stash[SPF_RESULT] = result
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast

from tampu.reply import Reply

T = TypeVar("T")
D = TypeVar("D")

ListenerKind = Literal["smtp", "submission", "submissions"]
"""smtp (MX, port 25), submission (587, AUTH required), submissions (465, implicit TLS)."""
SessionKind = Literal["smtp", "submission", "submissions", "local"]
"""A listener's kind, or ``local``: the local socket of ``tampu sendmail``."""


class StashKey(Generic[T]):
    """A typed key into a Stash. Create one per kind of value, at module level."""

    __slots__ = ()


class Stash:
    """A dict keyed by StashKey objects, so two plugins never collide on a name."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._data.setdefault(key, default))

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """The TLS state of a session once the handshake is done."""

    version: str
    cipher: str
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    name: str
    kind: SessionKind
    address: str


_session_ids = itertools.count(1)


@dataclass(eq=False)
class Session:
    """One SMTP connection. The core updates it; plugins read it and use ``stash``."""

    peer_host: str
    peer_port: int
    listener: ListenerInfo
    id: int = field(default_factory=lambda: next(_session_ids))
    helo: str | None = None
    esmtp: bool = False
    tls: TlsInfo | None = None
    auth_user: str | None = None
    """The authenticated user (``user@domain``), or None."""
    trusted_network: bool = False
    """Set by a plugin (relay's ``trusted_networks``): this client may relay without AUTH, as
    Postfix's mynetworks; its messages may leave for remote domains like an authenticated
    user's. Never set by the core itself."""
    local_user: str | None = None
    """On the local socket (``tampu sendmail``): the login of the program's user, from the
    socket's peer credentials. Such a session may relay; it is not ``authenticated`` (no
    AUTH took place, and the login is not a mail address)."""
    stash: Stash = field(default_factory=Stash)

    @property
    def authenticated(self) -> bool:
        return self.auth_user is not None

    @property
    def is_submission(self) -> bool:
        """Mail from a user of this server (AUTH, or a local program on the local socket),
        not from the internet: not checked like incoming mail (SPF, DKIM, DMARC), signed."""
        return self.auth_user is not None or self.local_user is not None

    @property
    def may_relay(self) -> bool:
        return self.auth_user is not None or self.trusted_network or self.local_user is not None


@dataclass(eq=False)
class Envelope:
    """One mail transaction: the sender, the accepted recipients and their parameters."""

    mail_from: str = ""
    """The reverse path; ``""`` is the null sender ``<>``."""
    mail_params: dict[str, str | bool] = field(default_factory=dict)
    rcpt_to: list[str] = field(default_factory=list)
    rcpt_params: list[dict[str, str | bool]] = field(default_factory=list)
    """The ESMTP parameters of each accepted recipient (``NOTIFY``, ``ORCPT``), in order."""
    smtputf8: bool = False
    stash: Stash = field(default_factory=Stash)

    @property
    def null_sender(self) -> bool:
        return self.mail_from == ""


_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII but ':'


def valid_header_name(name: str) -> bool:
    """Whether ``name`` can be a header field name (RFC 5322 2.2: printable ASCII but ``:``)."""
    return _HEADER_NAME.match(name) is not None


@dataclass(eq=False)
class Message:
    """The message after DATA: its bytes and the headers plugins ask to add on top."""

    data: bytes
    added_headers: list[tuple[str, str]] = field(default_factory=list)

    def add_header(self, name: str, value: str) -> None:
        """Ask the core to add ``name: value`` at the top of the message.

        Raises ValueError for a name or value that would corrupt the header section
        (bad characters, bare CR/LF that is not a folding of the value).
        """
        if not valid_header_name(name):
            raise ValueError(f"invalid header name: {name!r}")
        for i, line in enumerate(value.replace("\r\n", "\n").split("\n")):
            if "\r" in line or (i > 0 and line[:1] not in (" ", "\t")) or "\0" in line:
                raise ValueError(f"invalid header value for {name}: {value!r}")
        self.added_headers.append((name, value))

    def header_values(self, name: str) -> list[str]:
        """Values of header ``name`` in the received message (case-insensitive, unfolded)."""
        return [v for n, v in iter_headers(self.data) if n.lower() == name.lower()]

    def count_header(self, name: str) -> int:
        lname = name.lower().encode()
        n = 0
        for line in header_section(self.data).split(b"\n"):
            head, sep, _ = line.partition(b":")
            if sep and head.strip().lower() == lname:
                n += 1
        return n


def header_section(data: bytes) -> bytes:
    """The header section of a message (up to the first empty line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = data.find(sep)
        if idx >= 0:
            return data[:idx]
    return data


def iter_headers(data: bytes) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for raw in header_section(data).decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
        if raw[:1] in (" ", "\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + " " + raw.strip())
            continue
        name, sep, value = raw.partition(":")
        if sep:
            out.append((name.strip(), value.strip()))
    return out


Stage = Literal["connect", "helo", "auth", "mail", "rcpt", "data", "queue"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What was decided at one stage of a session, and by whom (``smtp_verdict``)."""

    stage: Stage
    reply: Reply
    """What the client was told."""
    plugin: str
    """The plugin whose answer decided, or ``core`` (syntax, limits, nobody accepted)."""
    address: str = ""
    """The address the stage was about (MAIL FROM, RCPT TO, the AUTH login)."""
    seconds: float = 0.0
    """How long the stage's hooks took."""

    @property
    def refused(self) -> bool:
        return not self.reply.is_positive


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The answer of an ``smtp_auth`` implementation.

    ``success`` True: the session is authenticated as ``user``. False: credentials are
    wrong (535), and no later plugin is asked. Return None from the hook for "not mine".
    """

    success: bool
    user: str | None = None
    reason: str = ""
