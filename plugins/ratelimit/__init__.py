"""``ratelimit``: per-address connection rate and concurrency, AUTH failure throttling and
lockout, recipients per hour per authenticated user.

The counters live in the server's state store (``context.state``): this node's memory by
default, a table every node shares with ``[server] state_store = "postgres"``, so that a client
cannot multiply its budget by the number of nodes. Counting windows are fixed: they start at
the first event and last their length (a minute, ``auth_window``, an hour). Concurrent
connections are counted per node. When the state store cannot be reached the limits are not
applied (logged as errors): a database outage does not stop mail.

It runs early (priority 10) and answers only when a limit is hit; within the limits it has no
opinion and the next plugins decide. IPv6 clients are counted per /64 (``ipv6_prefix``).

* Connections: over ``max_connections_per_minute`` or ``max_concurrent`` from one address, the
  client gets ``421 4.7.0`` instead of the greeting.
* AUTH: each failure from an address is answered after a growing delay (tarpit); after
  ``auth_max_failures`` failures within ``auth_window`` the address (and, after
  ``auth_max_failures_per_user``, the login) is locked out for ``auth_lockout`` seconds: every
  AUTH is answered ``535 5.7.8`` without checking the password.
* Recipients: an authenticated user may send to ``recipients_per_hour`` recipients per hour;
  beyond, RCPT gets ``452 4.7.1`` (clients retry later).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Iterable

from pydantic import Field, field_validator

from tampu import (
    AuthResult,
    Envelope,
    PluginContext,
    PluginSettings,
    Reply,
    Session,
    StashKey,
    StateError,
    hookimpl,
)

log = logging.getLogger("tampu.plugins.ratelimit")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try "
                                           "again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.7.1", "Too many recipients this hour, try again later")
LOCKED_OUT = "locked out"


class RateLimitSettings(PluginSettings):
    priority: int = Field(default=10, description="Order on each hook: before the plugins "
                          "that accept recipients or check passwords.")
    max_connections_per_minute: int = Field(default=60, ge=0, description="New connections "
                                            "per minute from one address; 0: no limit.")
    max_concurrent: int = Field(default=20, ge=0, description="Open connections from one "
                                "address; 0: no limit.")
    auth_failure_delay: float = Field(default=1.0, ge=0, description="Seconds added to the "
                                      "answer of a failed AUTH per recent failure from the same "
                                      "address (tarpit).")
    auth_max_delay: float = Field(default=5.0, ge=0, description="Longest tarpit delay in "
                                  "seconds (also kept under 80% of the hook timeout).")
    auth_max_failures: int = Field(default=10, ge=0, description="AUTH failures from one "
                                   "address within auth_window before it is locked out; 0: "
                                   "never.")
    auth_max_failures_per_user: int = Field(default=30, ge=0, description="AUTH failures for "
                                            "one login (from any address) within auth_window "
                                            "before the login is locked out; 0: never.")
    auth_window: float = Field(default=900.0, gt=0, description="Seconds over which AUTH "
                               "failures are counted.")
    auth_lockout: float = Field(default=900.0, ge=0, description="Seconds a lockout lasts.")
    recipients_per_hour: int = Field(default=0, ge=0, description="Recipients an "
                                     "authenticated user may send to per hour; 0: no limit "
                                     "(the default).")
    ipv6_prefix: int = Field(default=64, ge=32, le=128, description="IPv6 clients are counted "
                             "per network of this prefix length.")
    exempt: list[str] = Field(default_factory=list, description="Networks (CIDR) never "
                              "limited by address, e.g. your monitoring or webmail host.")

    @field_validator("exempt")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value


class Concurrent:
    """Open connections per address on this node (memory: a count that a node's crash would
    leave behind cannot be shared). Kept in the server stash so that reloads keep it."""

    def __init__(self) -> None:
        self.open: collections.Counter[str] = collections.Counter()


CONCURRENT: StashKey[Concurrent] = StashKey()
_CONN_KEY: StashKey[str] = StashKey()
NAMESPACE = "ratelimit"


class RateLimitPlugin:
    Settings = RateLimitSettings

    def __init__(self, ctx: PluginContext[RateLimitSettings]) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in ctx.settings.exempt]
        self.state = ctx.server.state
        # The server stash outlives reloads: the open connections carry over.
        self.concurrent = ctx.server.stash.setdefault(CONCURRENT, Concurrent()).open

    def address_key(self, host: str) -> str | None:
        """The counting key of a client address; None when exempt."""
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return host
        if _in(addr, self.exempt):
            return None
        if addr.version == 6 and self.settings.ipv6_prefix < 128:
            net = ipaddress.ip_network(f"{addr}/{self.settings.ipv6_prefix}", strict=False)
            return f"ip:{net}"
        return f"ip:{addr}"

    async def _count(self, key: str, by: int, window: float) -> int:
        """Add to a counter of the state store; 0 (no limit applied) if it is unreachable."""
        try:
            return await self.state.incr(NAMESPACE, key, by, ttl=window)
        except StateError as exc:
            log.error("ratelimit: counter %s not updated: %s", key, exc)
            return 0

    async def _locked_until(self, key: str) -> float:
        try:
            until = await self.state.get(NAMESPACE, f"lock:{key}")
        except StateError as exc:
            log.error("ratelimit: lockout of %s not checked: %s", key, exc)
            return 0.0
        return float(until) if isinstance(until, int | float) and until > time.time() else 0.0

    # ---------------------------------------------------------------- connections

    @hookimpl
    async def smtp_connect(self, session: Session) -> Reply | None:
        key = self.address_key(session.peer_host)
        if key is None:
            return None
        s = self.settings
        if s.max_concurrent and self.concurrent[key] >= s.max_concurrent:
            log.warning("ratelimit: %s has %d connections open; refused session %s",
                        session.peer_host, self.concurrent[key], session.id)
            return TOO_MANY_CONNECTIONS
        if s.max_connections_per_minute and await self._count(
                f"conn:{key}", 1, 60.0) > s.max_connections_per_minute:
            log.warning("ratelimit: %s made more than %d connections this minute; refused "
                        "session %s", session.peer_host, s.max_connections_per_minute,
                        session.id)
            return TOO_MANY_CONNECTIONS
        self.concurrent[key] += 1
        session.stash[_CONN_KEY] = key
        return None

    @hookimpl
    def smtp_disconnect(self, session: Session) -> None:
        key = session.stash.get(_CONN_KEY, None)
        if key is not None:
            self.concurrent[key] -= 1
            if self.concurrent[key] <= 0:
                del self.concurrent[key]

    # ---------------------------------------------------------------- AUTH

    def _auth_keys(self, session: Session, login: str) -> list[str]:
        keys = [f"user:{login.lower()}"]
        ip = self.address_key(session.peer_host)
        return [ip, *keys] if ip is not None else keys

    @hookimpl
    async def smtp_auth(self, session: Session, login: str) -> AuthResult | None:
        for key in self._auth_keys(session, login):
            until = await self._locked_until(key)
            if until:
                log.warning("ratelimit: session %s: AUTH for %r from %s refused: %s locked out "
                            "for %.0fs more", session.id, login, session.peer_host, key,
                            until - time.time())
                return AuthResult(success=False, reason=LOCKED_OUT)
        return None

    @hookimpl
    async def smtp_auth_result(self, session: Session, login: str, success: bool,
                               reason: str) -> None:
        if success or reason == "plugin error":
            return
        s = self.settings
        ip = self.address_key(session.peer_host)
        user = f"user:{login.lower()}"
        recent = 0
        if reason != LOCKED_OUT:
            if ip is not None:
                recent = await self._count(f"authfail:{ip}", 1, s.auth_window)
                await self._maybe_lock(ip, recent, s.auth_max_failures)
            failures = await self._count(f"authfail:{user}", 1, s.auth_window)
            await self._maybe_lock(user, failures, s.auth_max_failures_per_user)
        else:
            recent = s.auth_max_failures or 1
        timeout = s.hook_timeout or self.ctx.server.config.server.plugin_timeout
        delay = min(recent * s.auth_failure_delay, s.auth_max_delay, timeout * 0.8)
        if delay > 0 and ip is not None:
            await asyncio.sleep(delay)

    async def _maybe_lock(self, key: str, failures: int, limit: int) -> None:
        if not limit or failures < limit or not self.settings.auth_lockout:
            return
        until = time.time() + self.settings.auth_lockout
        try:
            locked = await self.state.compare_and_set(NAMESPACE, f"lock:{key}", None, until,
                                                      ttl=self.settings.auth_lockout)
        except StateError as exc:
            log.error("ratelimit: %s not locked out: %s", key, exc)
            return
        if locked:
            log.warning("ratelimit: %s locked out for %.0fs after %d AUTH failures", key,
                        self.settings.auth_lockout, failures)

    # ---------------------------------------------------------------- recipients

    @hookimpl
    async def smtp_rcpt_to(self, session: Session, envelope: Envelope) -> Reply | None:
        limit = self.settings.recipients_per_hour
        if not limit or session.auth_user is None:
            return None
        key = f"rcpt:user:{session.auth_user.lower()}"
        try:
            sent = await self.state.get(NAMESPACE, key)
        except StateError as exc:
            log.error("ratelimit: recipients of %s not checked: %s", session.auth_user, exc)
            return None
        if int(sent or 0) + len(envelope.rcpt_to) >= limit:
            log.warning("ratelimit: session %s: %s reached %d recipients per hour", session.id,
                        session.auth_user, limit)
            return TOO_MANY_RECIPIENTS
        return None

    @hookimpl
    async def smtp_transaction_done(self, session: Session, envelope: Envelope,
                                    queue_id: str | None) -> None:
        if queue_id is not None and session.auth_user is not None and \
                self.settings.recipients_per_hour:
            await self._count(f"rcpt:user:{session.auth_user.lower()}", len(envelope.rcpt_to),
                              3600.0)


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
        networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return any(addr in net for net in networks)
