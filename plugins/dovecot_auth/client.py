"""An asyncio client for Dovecot's authentication service (auth protocol 1.x), as chasquid's.

Dovecot's ``service auth`` listens on UNIX sockets; two of them are used here:

* the **client** socket (``auth-client``) checks passwords. The client sends
  ``VERSION\\t1\\t1`` and ``CPID\\t<pid>``; the server answers ``VERSION``, ``MECH`` (one per
  mechanism), ``SPID``, ``CUID``, ``COOKIE`` and ``DONE``. Then
  ``AUTH\\t<id>\\tPLAIN\\tservice=smtp\\tsecured\\tno-penalty\\tresp=<base64 of \\0user\\0pass>``
  gets ``OK\\t<id>\\tuser=...`` (right password), ``FAIL\\t<id>...`` (wrong password or unknown
  user; with ``code=temp_fail`` when Dovecot's own backend failed) or ``CONT`` (more data
  wanted: never for PLAIN with an initial response, so it is a protocol error here).
* the **userdb** socket (``auth-userdb``, the master protocol) looks users up. The server
  sends ``VERSION`` and ``SPID``; the client sends ``VERSION\\t1\\t0`` and
  ``USER\\t<id>\\t<user>\\tservice=smtp``, answered by ``USER\\t<id>\\t...`` (exists),
  ``NOTFOUND\\t<id>`` or ``FAIL\\t<id>`` (Dovecot's backend failed).

Fields are separated by tabs and lines end with LF, so every value is tab-escaped the way
Dovecot's ``str_tabescape`` does it (``\\x01`` → ``\\x011``, TAB → ``\\x01t``, CR → ``\\x01r``,
LF → ``\\x01n``) and Dovecot unescapes it: a user name cannot add fields or commands. The
password travels inside the base64 ``resp=`` field, which Dovecot requires to be last.

Answers are ``True``/``False``, or ``None`` when Dovecot could not answer (no socket, refused
connection, timeout, protocol error, or a ``FAIL``/``code=temp_fail`` that says Dovecot's own
backend failed): the caller answers with a temporary failure. Nothing here raises for those.
One connection per request (no pooling): on a UNIX socket the handshake costs well under a
millisecond, and a connection that broke cannot spoil later requests. Each request, connect
included, is bounded by ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final, TypeVar

__all__ = [
    "DEFAULT_CLIENT_PATHS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_USERDB_PATHS",
    "AuthAnswer",
    "DovecotAuth",
    "find_socket",
    "is_safe_username",
    "tab_escape",
    "tab_unescape",
]

DEFAULT_USERDB_PATHS: Final = (
    "/var/run/dovecot/auth-chasquid-userdb",
    "/var/run/dovecot/auth-userdb",
)
"""Userdb sockets tried in order when none is configured: chasquid's list."""

DEFAULT_CLIENT_PATHS: Final = (
    "/var/run/dovecot/auth-chasquid-client",
    "/var/run/dovecot/auth-client",
)
"""Client sockets tried in order when none is configured: chasquid's list."""

DEFAULT_TIMEOUT: Final = 5.0
"""Seconds per request, as chasquid. Dovecot delays every failed login by its
``auth_failure_delay`` (2 s by default), so keep it above that."""

MAX_LINE: Final = 65536
"""Longest line accepted from Dovecot (its own limit for requests is about 8 KiB)."""

MAX_LINES: Final = 64
"""Lines read (handshake and lines for other requests) before giving up on an answer."""

_ESCAPES: Final = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n"}
_UNESCAPES: Final = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\x00"}

_log = logging.getLogger("tampu.plugins.dovecot_auth")
_T = TypeVar("_T")


def tab_escape(value: str) -> str:
    """``value`` escaped for one field of a Dovecot auth protocol line (``str_tabescape``)."""
    if not any(ch in value for ch in _ESCAPES):
        return value
    return "".join(_ESCAPES.get(ch, ch) for ch in value)


def tab_unescape(value: str) -> str:
    """The inverse of :func:`tab_escape` (``str_tabunescape``), for fields Dovecot sends."""
    if "\x01" not in value:
        return value
    out: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\x01":
            nxt = next(chars, "")
            out.append(_UNESCAPES.get(nxt, nxt))
        else:
            out.append(ch)
    return "".join(out)


def is_safe_username(user: str) -> bool:
    """chasquid's rule, and then some: not empty, no white space, no control characters.

    Escaping already keeps such names from injecting fields; this is the policy that they are
    not user names at all (Dovecot's default ``auth_username_chars`` refuses them too).
    """
    return bool(user) and not any(
        ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in user)


def find_socket(candidates: Sequence[str]) -> str | None:
    """The first path of ``candidates`` that is a UNIX socket, or None (chasquid's check: no
    connection is made, Dovecot may start later)."""
    for path in candidates:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    return None


@dataclass(frozen=True, slots=True)
class AuthAnswer:
    """Dovecot's answer to a password check."""

    ok: bool | None
    """True: right password. False: wrong password, unknown or disabled user. None: Dovecot
    could not answer (temporary failure)."""
    user: str | None = None
    """The user name Dovecot gave back (``user=``), after its own normalization
    (``auth_username_format``, ``auth_default_realm``), when it sent one."""
    detail: str = ""
    """Why, for the log (never shown to the SMTP client)."""


class _ProtocolError(Exception):
    """Dovecot said something this client does not understand (or closed the connection)."""


def _fields(line: bytes) -> list[str]:
    if not line.endswith(b"\n"):
        raise _ProtocolError("connection closed by Dovecot")
    return line.rstrip(b"\r\n").decode("utf-8", "replace").split("\t")


def _params(fields: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for field in fields:
        name, _, value = field.partition("=")
        out.setdefault(name, tab_unescape(value))
    return out


class DovecotAuth:
    """Dovecot's auth service over its UNIX sockets: ``authenticate`` and ``exists``.

    ``userdb_path``/``client_path`` name the sockets; an empty one is autodetected on every
    request among ``userdb_candidates``/``client_candidates`` (chasquid's paths by default),
    so that Dovecot may start, restart or move after tampu did.
    """

    def __init__(
        self,
        userdb_path: str = "",
        client_path: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        *,
        userdb_candidates: Sequence[str] = DEFAULT_USERDB_PATHS,
        client_candidates: Sequence[str] = DEFAULT_CLIENT_PATHS,
        service: str = "smtp",
        log: logging.Logger | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.userdb_path = userdb_path
        self.client_path = client_path
        self.timeout = timeout
        self.userdb_candidates = tuple(userdb_candidates)
        self.client_candidates = tuple(client_candidates)
        self.service = service
        self.log = log or _log

    def __repr__(self) -> str:
        return f"DovecotAuth({self.userdb_socket()!r}, {self.client_socket()!r})"

    def userdb_socket(self) -> str | None:
        """The userdb socket to use now: the configured path, or the first candidate that is a
        socket (None when there is none)."""
        return self.userdb_path or find_socket(self.userdb_candidates)

    def client_socket(self) -> str | None:
        """The client socket to use now (like :meth:`userdb_socket`)."""
        return self.client_path or find_socket(self.client_candidates)

    # ------------------------------------------------------------------ public requests

    async def authenticate(self, user: str, password: str) -> bool | None:
        """Is ``password`` right for ``user``? None: Dovecot could not answer."""
        return (await self.check_password(user, password)).ok

    async def exists(self, user: str) -> bool | None:
        """Does Dovecot's userdb know ``user``? None: Dovecot could not answer."""
        if not user or "\x00" in user:
            return False
        path = self.userdb_socket()
        if path is None:
            self.log.warning("Dovecot userdb socket not found (tried %s)",
                             ", ".join(self.userdb_candidates))
            return None
        try:
            return await self._request(path, self._userdb_exchange, user)
        except (OSError, TimeoutError, ValueError, _ProtocolError) as exc:
            self.log.warning("Dovecot userdb %s: lookup of %r failed: %s", path, user,
                             _describe(exc, self.timeout))
            return None

    async def check_password(self, user: str, password: str, *, remote_ip: str = "",
                             local_ip: str = "") -> AuthAnswer:
        """Ask Dovecot to check ``user``'s ``password`` (PLAIN), with Dovecot's canonical name.

        ``remote_ip``/``local_ip``, when given, are passed as ``rip``/``lip`` (Dovecot logs
        them and applies ``allow_nets``). A user or password containing NUL cannot be said in
        PLAIN and is refused without asking.
        """
        if not user or "\x00" in user or "\x00" in password:
            return AuthAnswer(False, detail="NUL in user or password")
        path = self.client_socket()
        if path is None:
            self.log.warning("Dovecot client socket not found (tried %s)",
                             ", ".join(self.client_candidates))
            return AuthAnswer(None, detail="no Dovecot client socket")
        extra = [f"{name}={tab_escape(value)}"
                 for name, value in (("rip", remote_ip), ("lip", local_ip)) if value]
        try:
            answer: AuthAnswer = await self._request(path, self._client_exchange, user,
                                                     password, extra)
        except (OSError, TimeoutError, ValueError, _ProtocolError) as exc:
            detail = _describe(exc, self.timeout)
            self.log.warning("Dovecot client %s: authentication of %r failed: %s", path, user,
                             detail)
            return AuthAnswer(None, detail=detail)
        if answer.ok is None:
            self.log.warning("Dovecot client %s: temporary failure for %r: %s", path, user,
                             answer.detail)
        return answer

    # ------------------------------------------------------------------ the exchanges

    async def _request(self, path: str, exchange: Callable[..., Awaitable[_T]],
                       *args: Any) -> _T:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
            try:
                return await exchange(reader, writer, *args)
            finally:
                writer.close()
                with suppress(OSError):
                    await writer.wait_closed()

    async def _userdb_exchange(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, user: str) -> bool | None:
        # The server speaks first: VERSION, then SPID.
        for _ in range(MAX_LINES):
            fields = _fields(await reader.readline())
            if fields[0] == "VERSION":
                _check_version(fields)
            elif fields[0] == "SPID":
                break
        else:
            raise _ProtocolError("no SPID in the handshake")
        writer.write(f"VERSION\t1\t0\nUSER\t1\t{tab_escape(user)}\t"
                     f"service={tab_escape(self.service)}\n".encode())
        await writer.drain()
        for _ in range(MAX_LINES):
            fields = _fields(await reader.readline())
            if len(fields) < 2 or fields[1] != "1":
                continue
            if fields[0] == "USER":
                return True
            if fields[0] == "NOTFOUND":
                return False
            if fields[0] == "FAIL":
                self.log.warning("Dovecot userdb: lookup of %r failed in Dovecot: %s", user,
                                 " ".join(fields[2:]) or "no reason given")
                return None
            raise _ProtocolError(f"unexpected answer {fields[0]!r}")
        raise _ProtocolError("no answer to USER")

    async def _client_exchange(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, user: str, password: str,
                               extra: list[str]) -> AuthAnswer:
        writer.write(f"VERSION\t1\t1\nCPID\t{os.getpid()}\n".encode())
        await writer.drain()
        mechanisms: set[str] = set()
        for _ in range(MAX_LINES):
            fields = _fields(await reader.readline())
            if fields[0] == "VERSION":
                _check_version(fields)
            elif fields[0] == "MECH" and len(fields) > 1:
                mechanisms.add(fields[1].upper())
            elif fields[0] == "DONE":
                break
        else:
            raise _ProtocolError("no DONE in the handshake")
        if "PLAIN" not in mechanisms:
            raise _ProtocolError("Dovecot does not offer PLAIN (auth_mechanisms)")
        resp = base64.b64encode(b"\x00" + user.encode() + b"\x00" + password.encode())
        request = "\t".join(["AUTH", "1", "PLAIN", f"service={tab_escape(self.service)}",
                             "secured", "no-penalty", *extra, f"resp={resp.decode()}"])
        writer.write(request.encode() + b"\n")
        await writer.drain()
        for _ in range(MAX_LINES):
            fields = _fields(await reader.readline())
            if len(fields) < 2 or fields[1] != "1":
                continue
            params = _params(fields[2:])
            if fields[0] == "OK":
                return AuthAnswer(True, user=params.get("user"), detail="OK")
            if fields[0] == "FAIL":
                code = params.get("code", "")
                if code in ("temp_fail", "temp") or "temp" in params:
                    return AuthAnswer(None, user=params.get("user"),
                                      detail=f"Dovecot temporary failure: {params}")
                return AuthAnswer(False, user=params.get("user"),
                                  detail=f"Dovecot refused: {code or 'invalid credentials'}")
            raise _ProtocolError(f"unexpected answer {fields[0]!r}")
        raise _ProtocolError("no answer to AUTH")


def _check_version(fields: Sequence[str]) -> None:
    if len(fields) < 2 or fields[1] != "1":
        raise _ProtocolError(f"unsupported protocol version {fields[1:]}")


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__
