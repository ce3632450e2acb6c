"""``sender_policy``: an authenticated user sends only as an address of their own.

At ``MAIL FROM`` (and, in ``envelope+header`` mode, at the end of DATA for every address of
the ``From:`` header) the sender of an authenticated session must be one the user receives
mail for (:mod:`.check`): the user's own address, in any spelling the user directory takes
as the same mailbox (``+tag`` suffixes, drop characters, case), or an address in a local
domain whose aliases resolve to the user. Anything else gets ``550 5.7.1``.

The mode (``off``, ``envelope``, ``envelope+header``) is set for all users and per domain of
the authenticated user; users in ``allowed_users`` may send as anyone. Sessions that did not
authenticate are never judged here (SPF, DKIM and DMARC judge them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tampu import (
    Envelope,
    Message,
    PluginContext,
    PluginSettings,
    Reply,
    Session,
    StashKey,
    hookimpl,
)
from tampu.addresses import AddressError, normalize_address, normalize_domain
from tampu.plugins.sender_policy.check import SenderCheck, alias_resolver, from_addresses

__all__ = ["DomainPolicy", "Mode", "SenderPolicyPlugin", "SenderPolicySettings"]

Mode = Literal["off", "envelope", "envelope+header"]

_ALLOWED: StashKey[set[str]] = StashKey()
"""Addresses already found to be the session user's in this transaction (MAIL FROM), so the
header check does not resolve them again."""


class DomainPolicy(BaseModel):
    """``[plugins.sender_policy.domains."example.com"]``: the policy of one domain's users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Field(description="off, envelope or envelope+header for the users of this "
                       "domain.")


class SenderPolicySettings(PluginSettings):
    priority: int = Field(default=15, description="Order on each hook: lower runs first. Low, "
                          "so that the sender is judged before any plugin accepts it.")
    mode: Mode = Field(default="envelope", description="What is checked for authenticated "
                       "users: off (nothing), envelope (MAIL FROM) or envelope+header (MAIL "
                       "FROM and every address of the From: header).")
    domains: dict[str, DomainPolicy] = Field(
        default_factory=dict, description="Mode per domain of the authenticated user "
        "(sub-tables: [plugins.sender_policy.domains.\"example.com\"] mode = ...); other "
        "domains use mode.")
    allowed_users: list[str] = Field(default_factory=list, description="Users "
                                     "(user@domain) who may send as any address: a "
                                     "webmail's service account, a mailing list manager.")
    null_sender: bool = Field(default=True, description="Authenticated users may use the "
                              "null sender <> (read receipts, RFC 8098; vacation replies): "
                              "it names nobody, so it impersonates nobody.")

    @field_validator("domains")
    @classmethod
    def _canonical_domains(cls, value: dict[str, DomainPolicy]) -> dict[str, DomainPolicy]:
        out: dict[str, DomainPolicy] = {}
        for domain, policy in value.items():
            try:
                out[normalize_domain(domain)] = policy
            except AddressError as exc:
                raise ValueError(str(exc)) from None
        return out

    @field_validator("allowed_users")
    @classmethod
    def _canonical_users(cls, value: list[str]) -> list[str]:
        out = []
        for user in value:
            if "@" not in user.strip("@"):
                raise ValueError(f"{user!r} is not user@domain")
            try:
                out.append(normalize_address(user.strip()))
            except AddressError as exc:
                raise ValueError(str(exc)) from None
        return out


class SenderPolicyPlugin:
    Settings = SenderPolicySettings

    def __init__(self, ctx: PluginContext[SenderPolicySettings]) -> None:
        self.ctx = ctx
        server = ctx.server.config.server
        self.check = SenderCheck(ctx.server, alias_resolver(ctx.server),
                                 server.suffix_separators, server.drop_characters)
        self.allowed = frozenset(filter(None, (self.check.key(u)
                                               for u in ctx.settings.allowed_users)))
        self.modes = {domain: policy.mode for domain, policy in ctx.settings.domains.items()}

    def mode_for(self, user: str) -> Mode:
        """The mode that applies to the authenticated ``user``: their domain's, else mode."""
        key = self.check.key(user)
        if key is not None and key[1] in self.modes:
            return self.modes[key[1]]
        return self.ctx.settings.mode

    def _judged(self, session: Session, *, header: bool) -> str | None:
        """The session user when this stage is to be checked for them, else None."""
        user = session.auth_user
        if user is None:
            return None  # not authenticated: SPF, DKIM and DMARC judge the sender
        mode = self.mode_for(user)
        if mode == "off" or (header and mode != "envelope+header"):
            return None
        if self.check.key(user) in self.allowed:
            return None
        return user

    @hookimpl
    async def smtp_mail_from(self, session: Session, envelope: Envelope, address: str,
                             params: dict[str, str | bool]) -> Reply | None:
        user = self._judged(session, header=False)
        if user is None:
            return None
        if not address:
            if self.ctx.settings.null_sender:
                return None
            return self._refuse(session, user, "<>", "The null sender <> is not allowed for "
                                f"{user}: send as one of your own addresses")
        answer = await self.check.owns(user, address)
        if answer.temporary:
            return self._tempfail(session, user, address, answer.reason)
        if not answer.allowed:
            return self._refuse(session, user, address, f"Sender <{address}> is not allowed "
                                f"for {user}: send as one of your own addresses or aliases")
        envelope.stash.setdefault(_ALLOWED, set()).add(address)
        return None

    @hookimpl
    async def smtp_data(self, session: Session, envelope: Envelope,
                        message: Message) -> Reply | None:
        user = self._judged(session, header=True)
        if user is None:
            return None
        addresses, problem = from_addresses(message.header_values("From"))
        if problem:
            return self._refuse(session, user, "From:", f"Cannot tell who the From: header "
                                f"names ({problem}); {user} may send only as their own "
                                "addresses")
        known = envelope.stash.get(_ALLOWED, set())
        for address in addresses:
            if address in known:
                continue
            answer = await self.check.owns(user, address)
            if answer.temporary:
                return self._tempfail(session, user, address, answer.reason)
            if not answer.allowed:
                return self._refuse(session, user, f"From: {address}", f"From: <{address}> "
                                    f"is not allowed for {user}: write one of your own "
                                    "addresses or aliases in From:")
        return None

    def _refuse(self, session: Session, user: str, what: str, text: str) -> Reply:
        self.ctx.log.info("session=%s user %s may not send as %s", session.id, user, what)
        return Reply(550, "5.7.1", text)

    def _tempfail(self, session: Session, user: str, address: str, why: str) -> Reply:
        self.ctx.log.warning("session=%s cannot check whether %s may send as <%s>: %s",
                             session.id, user, address, why)
        return Reply(451, "4.3.0", "Cannot check the sender address now, try again later")
