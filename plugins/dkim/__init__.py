"""``dkim``: DKIM signing of outgoing mail and verification of incoming mail (RFC 6376).

* **Signing** (``queue_add_headers``): mail from authenticated sessions and mail the server
  makes (DSNs, forwards) is signed for the domain of its From address when that domain is
  local and has keys, ``domains/<domain>/dkim:<selector>.pem`` as in chasquid: one
  DKIM-Signature per selector, put on top of the message before it is queued.
* **Verification** (``smtp_data``): every DKIM-Signature of mail from unauthenticated
  sessions is checked, key records fetched through tampu's asynchronous DNS client; each
  result is recorded with :func:`tampu.authres.add_result` (``dkim=pass header.d=...``), which
  DMARC reads. Nothing is ever refused for DKIM alone.

Also provides ``tampu dkim keygen`` and ``tampu dkim dns``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from pydantic import Field, field_validator

from tampu import (
    ConfigError,
    Envelope,
    Message,
    PluginContext,
    PluginSettings,
    QueueItem,
    Reply,
    ServerContext,
    Session,
    hookimpl,
)
from tampu.authres import add_result
from tampu.plugins.dkim.keys import KeyStore
from tampu.plugins.dkim.sign import (
    DEFAULT_HEADERS,
    NEVER_SIGNED,
    SigningError,
    author_domain,
    sign,
)
from tampu.plugins.dkim.verify import SignatureResult, Verifier

__all__ = ["DkimPlugin", "DkimSettings", "SignatureResult"]

SIGNED_ORIGINS = ("dsn", "forward", "local")
"""Mail the server makes itself, and mail from local programs (``tampu sendmail``): signed
like mail from authenticated users."""


class DkimSettings(PluginSettings):
    priority: int = Field(default=30, description="Order on each hook: lower runs first. After "
                          "spf (20) and before plugins that read the DKIM results in "
                          "smtp_data (DMARC).")
    sign: bool = Field(default=True, description="Sign mail from authenticated users and mail "
                       "the server makes, for local domains that have keys in "
                       "domains/<domain>/dkim:<selector>.pem.")
    verify: bool = Field(default=True, description="Verify the DKIM signatures of mail from "
                         "unauthenticated sessions and record the results (for DMARC and "
                         "Authentication-Results). Never refuses mail by itself.")
    headers: list[str] = Field(default=list(DEFAULT_HEADERS), min_length=1,
                               description="Header fields to sign, those the message has; "
                               "From is always signed and signed once more than it occurs "
                               "(RFC 6376 8.15).")
    verify_timeout: float = Field(default=10.0, gt=0, description="Seconds the verification "
                                  "of one message may take, key lookups included; what is "
                                  "left unverified then is temperror. Keep it below [server] "
                                  "plugin_timeout.")
    max_signatures: int = Field(default=10, ge=1, le=100, description="DKIM-Signature fields "
                                "checked per message; more are reported as one neutral "
                                "result.")

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: list[str]) -> list[str]:
        names = [v.strip() for v in value]
        for name in names:
            if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
                raise ValueError(f"{name!r} is not a header field name")
            if name.lower() in NEVER_SIGNED:
                raise ValueError(f"{name} must not be signed (RFC 6376 5.4.1)")
        if "from" not in {n.lower() for n in names}:
            names.insert(0, "From")
        return names


class DkimPlugin:
    Settings = DkimSettings

    def __init__(self, ctx: PluginContext[DkimSettings]) -> None:
        self.ctx = ctx
        server = ctx.server
        self.keys = KeyStore(server.config.domains_dir, server.file_stamp)
        if ctx.settings.sign:
            problems = self.keys.load_all()
            if problems:
                raise ConfigError(problems)
        self.resolver = server.dns  # the server's one DNS client (TTL cache)
        limit = ctx.settings.hook_timeout or server.config.server.plugin_timeout
        timeout = ctx.settings.verify_timeout
        if ctx.settings.verify and timeout >= limit:
            timeout = 0.9 * limit
            ctx.log.warning("[plugins.dkim] verify_timeout (%.1f s) is not below the hook "
                            "timeout (%.1f s): using %.1f s, so that a slow key lookup gives "
                            "temperror rather than 451", ctx.settings.verify_timeout, limit,
                            timeout)
        self.verifier = Verifier(self.resolver, timeout=timeout,
                                 max_signatures=ctx.settings.max_signatures)

    # ------------------------------------------------------------------ signing

    def signatures(self, item: QueueItem, message: bytes) -> list[tuple[str, str]]:
        """The DKIM-Signature fields for a new queue item (none if it is not ours to sign)."""
        if not self.ctx.settings.sign:
            return []
        if item.auth_user is None and item.origin not in SIGNED_ORIGINS:
            return []
        domain = author_domain(message)
        if domain is None or not self.ctx.server.is_local_domain(domain):
            return []
        keys = self.keys.keys(domain)
        if not keys:
            return []
        try:
            fields = sign(message, keys, self.ctx.settings.headers)
        except SigningError as exc:  # the message still goes out, unsigned
            self.ctx.log.warning("qid=%s not DKIM-signed: %s", item.id, exc)
            return []
        log = self.ctx.log
        if log.isEnabledFor(logging.DEBUG):  # nothing to pay at the default level
            log.debug("qid=%s DKIM-signed for %s with %s", item.id, domain,
                      ", ".join(f"{k.selector} ({k.algorithm})" for k in keys))
        return fields

    @hookimpl
    async def queue_add_headers(self, item: QueueItem,
                                message: bytes) -> list[tuple[str, str]] | None:
        if not self.ctx.settings.sign or (item.auth_user is None
                                          and item.origin not in SIGNED_ORIGINS):
            return None  # not ours to sign: no thread hop for the message
        # RSA-2048 signing with dkimpy takes about 10 ms of CPU (docs/plugins/dkim.md)
        return await asyncio.to_thread(self.signatures, item, message) or None

    # ------------------------------------------------------------------ verification

    @hookimpl
    async def smtp_data(self, session: Session, envelope: Envelope,
                        message: Message) -> Reply | None:
        if not self.ctx.settings.verify or session.is_submission:
            return None
        results = await self.verifier.verify(message.data)
        if not results:
            add_result(envelope, SignatureResult("none").method_result())
            return None
        for res in results:
            add_result(envelope, res.method_result())
        log = self.ctx.log
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session=%s DKIM %s", session.id, "; ".join(map(str, results)))
        return None

    # ------------------------------------------------------------------ lifecycle

    @hookimpl
    def tampu_reload(self, context: ServerContext) -> None:
        self.keys.refresh()


@hookimpl
def tampu_register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tampu dkim keygen|dns``."""
    from tampu.plugins.dkim.cli import register

    register(subparsers)
