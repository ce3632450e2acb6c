"""SMTP AUTH (PLAIN, LOGIN) for tampu's SMTP protocol, through the ``smtp_auth`` hook.

aiosmtpd's own AUTH refuses to run on an implicit-TLS listener (it only knows STARTTLS) and
checks credentials synchronously; this mixin replaces it: AUTH is offered and accepted once the
session is encrypted, by either means, and plugins decide.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import TYPE_CHECKING

from aiosmtpd.smtp import MISSING, SMTP, syntax

from tampu import reply as R
from tampu.envelope import AuthResult, Envelope, Session
from tampu.errors import PluginError
from tampu.reply import Reply

if TYPE_CHECKING:
    from tampu.server import ServerState

log = logging.getLogger("tampu.smtp")


class AuthMixin(SMTP):
    """``smtp_AUTH`` and the PLAIN/LOGIN exchanges; mixed into TampuSMTP."""

    state: ServerState
    tsession: Session | None
    tenvelope: Envelope

    async def _reply(self, reply: Reply) -> None:
        await self.push(str(reply))

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        assert self.tsession is not None
        if await self.check_helo_needed("EHLO"):
            return
        if not self.tsession.esmtp:
            await self._reply(Reply(503, "5.5.1", "AUTH needs EHLO"))
            return
        if self.tsession.tls is None:
            await self._reply(R.ENCRYPTION_REQUIRED)
            return
        if self.tsession.authenticated:
            await self._reply(Reply(503, "5.5.1", "Already authenticated"))
            return
        assert self.session is not None and self.envelope is not None
        if self.tenvelope.mail_from or self.envelope.mail_from:
            await self._reply(Reply(503, "5.5.1", "AUTH not permitted during a transaction"))
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self._reply(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            creds = await self._auth_plain(args)
        elif mechanism == "LOGIN":
            creds = await self._auth_login(args)
        else:
            await self._reply(Reply(504, "5.5.4", "Unrecognized authentication mechanism"))
            return
        if creds is None:
            return
        login, password = creds
        try:
            result = await self.state.hooks.smtp_auth(self.tsession, mechanism, login, password)
        except PluginError:
            await self.state.hooks.smtp_auth_result(self.tsession, login, False, "plugin error")
            await self._reply(R.AUTH_TEMPFAIL)
            return
        if isinstance(result, AuthResult) and result.success:
            self.tsession.auth_user = result.user or login
            self.session.authenticated = True
            log.info("session %s: authenticated as %s", self.tsession.id,
                     self.tsession.auth_user)
            await self.state.hooks.smtp_auth_result(self.tsession, login, True, result.reason)
            await self._reply(R.AUTH_OK)
            return
        reason = result.reason if isinstance(result, AuthResult) else "no plugin answered"
        log.info("session %s: AUTH failed for %r from %s (%s)", self.tsession.id, login,
                 self.tsession.peer_host, reason)
        await self.state.hooks.smtp_auth_result(self.tsession, login, False, reason)
        await self._reply(R.AUTH_INVALID)

    async def _challenge(self, prompt: bytes) -> bytes | None:
        got = await self.challenge_auth(prompt)
        return None if got is MISSING else bytes(got)

    async def _decode(self, b64: str) -> bytes | None:
        try:
            return base64.b64decode(b64.encode(), validate=True)
        except (binascii.Error, ValueError):
            await self._reply(Reply(501, "5.5.2", "Cannot decode base64"))
            return None

    async def _auth_plain(self, args: list[str]) -> tuple[str, str] | None:
        blob = await (self._decode(args[1]) if len(args) == 2 else self._challenge(b""))
        if blob is None:
            return None
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self._reply(Reply(501, "5.5.2", "Cannot split AUTH PLAIN response"))
            return None
        authz, login, password = (p.decode("utf-8", "replace") for p in parts)
        if authz and authz != login:
            await self._reply(Reply(535, "5.7.8", "Authorization identity must match login"))
            return None
        return login, password

    async def _auth_login(self, args: list[str]) -> tuple[str, str] | None:
        user = await (self._decode(args[1]) if len(args) == 2 else self._challenge(b"Username:"))
        if user is None:
            return None
        password = await self._challenge(b"Password:")
        if password is None:
            return None
        return user.decode("utf-8", "replace"), password.decode("utf-8", "replace")
