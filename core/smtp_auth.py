"""SMTP AUTH (RFC 4954): the PLAIN and LOGIN exchanges, then the ``smtp_auth`` hook.

AUTH is offered and accepted only once the session is encrypted (STARTTLS or an implicit-TLS
listener); plugins decide whether the credentials are good.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Protocol

from tampu import reply as R
from tampu.envelope import AuthResult, Session
from tampu.errors import PluginError
from tampu.facade import Hooks
from tampu.reply import Reply


class Challenger(Protocol):
    """What the AUTH exchange needs of the session: a way to ask, and the hooks."""

    @property
    def hooks(self) -> Hooks: ...

    async def challenge(self, prompt: bytes) -> str | None: ...

log = logging.getLogger("tampu.smtp")

CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")


def _decode(text: str | None) -> bytes | Reply:
    if text is None:
        return CANCELLED
    try:
        return base64.b64decode(text.encode("ascii", "replace"), validate=True)
    except (binascii.Error, ValueError):
        return BAD_BASE64


async def credentials(conn: Challenger, mechanism: str,
                      initial: str | None) -> tuple[str, str] | Reply:
    """(login, password) from the client, or the reply that ends the exchange."""
    if mechanism == "PLAIN":
        blob = _decode(initial if initial is not None else await conn.challenge(b""))
        if isinstance(blob, Reply):
            return blob
        parts = blob.split(b"\0")
        if len(parts) != 3:
            return Reply(501, "5.5.2", "Cannot split AUTH PLAIN response")
        authz, login, password = (p.decode("utf-8", "replace") for p in parts)
        if authz and authz != login:
            return Reply(535, "5.7.8", "Authorization identity must match login")
        return login, password
    name = _decode(initial if initial is not None else await conn.challenge(b"Username:"))
    if isinstance(name, Reply):
        return name
    secret = _decode(await conn.challenge(b"Password:"))
    if isinstance(secret, Reply):
        return secret
    return name.decode("utf-8", "replace"), secret.decode("utf-8", "replace")


async def authenticate(conn: Challenger, session: Session, arg: str) -> tuple[Reply, str]:
    """Run one AUTH command: (the reply to send, the login tried)."""
    args = arg.split()
    if not args or len(args) > 2:
        return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"), ""
    mechanism = args[0].upper()
    if mechanism not in ("PLAIN", "LOGIN"):
        return Reply(504, "5.5.4", "Unrecognized authentication mechanism"), ""
    initial = args[1] if len(args) == 2 else None
    if initial == "=":
        initial = ""  # RFC 4954 4: an empty initial response
    got = await credentials(conn, mechanism, initial)
    if isinstance(got, Reply):
        return got, ""
    login, password = got
    hooks = conn.hooks
    try:
        result, _plugin = await hooks.smtp_auth(session, mechanism, login, password)
    except PluginError:
        await hooks.smtp_auth_result(session, login, False, "plugin error")
        return R.AUTH_TEMPFAIL, login
    if isinstance(result, AuthResult) and result.success:
        session.auth_user = result.user or login
        log.info("session %s: authenticated as %s", session.id, session.auth_user)
        await hooks.smtp_auth_result(session, login, True, result.reason)
        return R.AUTH_OK, login
    reason = result.reason if isinstance(result, AuthResult) else "no plugin answered"
    log.info("session %s: AUTH failed for %r from %s (%s)", session.id, login,
             session.peer_host, reason)
    await hooks.smtp_auth_result(session, login, False, reason)
    return R.AUTH_INVALID, login
