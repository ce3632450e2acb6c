"""``ratelimit``: per-address connection rate and concurrency, AUTH failure throttling and
lockout, recipients per hour per authenticated user.

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
    hookimpl,
)

log = logging.getLogger("tampu.plugins.ratelimit")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try "
                                           "again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.7.1", "Too many recipients this hour, try again later")
LOCKED_OUT = "locked out"
MAX_KEYS = 100_000
"""Addresses and users tracked per table; the least recently seen are forgotten beyond."""


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


class Window:
    """Event times per key within a sliding window, for a bounded number of keys."""

    def __init__(self) -> None:
        self.events: collections.OrderedDict[str, collections.deque[tuple[float, int]]] = \
            collections.OrderedDict()

    def count(self, key: str, window: float, now: float) -> int:
        events = self.events.get(key)
        if events is None:
            return 0
        while events and events[0][0] <= now - window:
            events.popleft()
        if not events:
            del self.events[key]
            return 0
        return sum(n for _, n in events)

    def add(self, key: str, now: float, n: int = 1) -> None:
        events = self.events.setdefault(key, collections.deque())
        events.append((now, n))
        self.events.move_to_end(key)
        while len(self.events) > MAX_KEYS:
            self.events.popitem(last=False)


class Limits:
    """The counters of one server; kept in the server stash so that reloads keep them."""

    def __init__(self) -> None:
        self.connects = Window()
        self.concurrent: collections.Counter[str] = collections.Counter()
        self.auth_ip = Window()
        self.auth_user = Window()
        self.locked: dict[str, float] = {}
        self.recipients = Window()

    def locked_until(self, key: str, now: float) -> float:
        until = self.locked.get(key, 0.0)
        if until and until <= now:
            del self.locked[key]
            return 0.0
        return until

    def lock(self, key: str, until: float) -> None:
        self.locked[key] = until
        if len(self.locked) > MAX_KEYS:
            now = time.monotonic()
            for k in [k for k, t in self.locked.items() if t <= now]:
                del self.locked[k]


LIMITS: StashKey[Limits] = StashKey()
_CONN_KEY: StashKey[str] = StashKey()


class RateLimitPlugin:
    Settings = RateLimitSettings

    def __init__(self, ctx: PluginContext[RateLimitSettings]) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in ctx.settings.exempt]
        # The server stash outlives reloads: the counters carry over to the new instance.
        self.limits = ctx.server.stash.setdefault(LIMITS, Limits())

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

    # ---------------------------------------------------------------- connections

    @hookimpl
    def smtp_connect(self, session: Session) -> Reply | None:
        key = self.address_key(session.peer_host)
        if key is None:
            return None
        s, now = self.settings, time.monotonic()
        if s.max_concurrent and self.limits.concurrent[key] >= s.max_concurrent:
            log.warning("ratelimit: %s has %d connections open; refused session %s",
                        session.peer_host, self.limits.concurrent[key], session.id)
            return TOO_MANY_CONNECTIONS
        if s.max_connections_per_minute and \
                self.limits.connects.count(key, 60.0, now) >= s.max_connections_per_minute:
            log.warning("ratelimit: %s made %d connections in the last minute; refused "
                        "session %s", session.peer_host, s.max_connections_per_minute,
                        session.id)
            return TOO_MANY_CONNECTIONS
        self.limits.connects.add(key, now)
        self.limits.concurrent[key] += 1
        session.stash[_CONN_KEY] = key
        return None

    @hookimpl
    def smtp_disconnect(self, session: Session) -> None:
        key = session.stash.get(_CONN_KEY, None)
        if key is not None:
            self.limits.concurrent[key] -= 1
            if self.limits.concurrent[key] <= 0:
                del self.limits.concurrent[key]

    # ---------------------------------------------------------------- AUTH

    def _auth_keys(self, session: Session, login: str) -> list[str]:
        keys = [f"user:{login.lower()}"]
        ip = self.address_key(session.peer_host)
        return [ip, *keys] if ip is not None else keys

    @hookimpl
    def smtp_auth(self, session: Session, login: str) -> AuthResult | None:
        now = time.monotonic()
        for key in self._auth_keys(session, login):
            until = self.limits.locked_until(key, now)
            if until:
                log.warning("ratelimit: session %s: AUTH for %r from %s refused: %s locked out "
                            "for %.0fs more", session.id, login, session.peer_host, key,
                            until - now)
                return AuthResult(success=False, reason=LOCKED_OUT)
        return None

    @hookimpl
    async def smtp_auth_result(self, session: Session, login: str, success: bool,
                               reason: str) -> None:
        if success or reason == "plugin error":
            return
        s, now = self.settings, time.monotonic()
        ip = self.address_key(session.peer_host)
        user = f"user:{login.lower()}"
        recent = 0
        if reason != LOCKED_OUT:
            if ip is not None:
                self.limits.auth_ip.add(ip, now)
                recent = self.limits.auth_ip.count(ip, s.auth_window, now)
                self._maybe_lock(ip, recent, s.auth_max_failures, now)
            self.limits.auth_user.add(user, now)
            self._maybe_lock(user, self.limits.auth_user.count(user, s.auth_window, now),
                             s.auth_max_failures_per_user, now)
        else:
            recent = s.auth_max_failures or 1
        timeout = s.hook_timeout or self.ctx.server.config.server.plugin_timeout
        delay = min(recent * s.auth_failure_delay, s.auth_max_delay, timeout * 0.8)
        if delay > 0 and ip is not None:
            await asyncio.sleep(delay)

    def _maybe_lock(self, key: str, failures: int, limit: int, now: float) -> None:
        if limit and failures >= limit and not self.limits.locked_until(key, now):
            self.limits.lock(key, now + self.settings.auth_lockout)
            log.warning("ratelimit: %s locked out for %.0fs after %d AUTH failures", key,
                        self.settings.auth_lockout, failures)

    # ---------------------------------------------------------------- recipients

    @hookimpl
    def smtp_rcpt_to(self, session: Session, envelope: Envelope) -> Reply | None:
        limit = self.settings.recipients_per_hour
        if not limit or session.auth_user is None:
            return None
        key = f"user:{session.auth_user.lower()}"
        sent = self.limits.recipients.count(key, 3600.0, time.monotonic())
        if sent + len(envelope.rcpt_to) >= limit:
            log.warning("ratelimit: session %s: %s reached %d recipients per hour", session.id,
                        session.auth_user, limit)
            return TOO_MANY_RECIPIENTS
        return None

    @hookimpl
    def smtp_transaction_done(self, session: Session, envelope: Envelope,
                              queue_id: str | None) -> None:
        if queue_id is not None and session.auth_user is not None and \
                self.settings.recipients_per_hour:
            self.limits.recipients.add(f"user:{session.auth_user.lower()}", time.monotonic(),
                                       len(envelope.rcpt_to))


def _in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
        networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return any(addr in net for net in networks)
