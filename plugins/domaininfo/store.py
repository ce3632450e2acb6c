"""The per-domain security levels (chasquid's domaininfo), kept in the server's state store.

One value per domain in namespace ``domaininfo`` of ``context.state``::

    {"domain": "example.com", "incoming": "plain", "outgoing": "tls_verified"}

With the default state store that is one small JSON file per domain,
``<data_dir>/domaininfo/<domain>.json``, replaced atomically and raised under an ``flock``, so
reception workers and the delivery process share it (removing a file forgets the domain, the
manual override for a domain that really lowered its security). With ``state_store =
"postgres"`` it is a row every node shares: a level learned on one node is enforced on all.
Levels only go up, by compare-and-set, so two nodes raising the same domain never lose one.

Other plugins reach the store through the server's stash::

    from tampu.plugins.domaininfo.store import DOMAININFO_STORE, SecLevel
    store = context.stash.get(DOMAININFO_STORE, None)   # None: domaininfo is not enabled
    ok = await store.check_outgoing("example.com", SecLevel.TLS_VERIFIED)

Every method is a coroutine; ``cached_level`` is the exception (memory only, for a fast path
on the event loop: what was read less than ``check_interval`` seconds ago).
"""

from __future__ import annotations

import logging
import time
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from tampu import StashKey
from tampu.addresses import AddressError, normalize_domain
from tampu.state_store import LocalStateStore, StateStore, update

log = logging.getLogger("tampu.plugins.domaininfo")

Direction = Literal["incoming", "outgoing"]
NAMESPACE = "domaininfo"
MAX_CACHED = 10_000


class SecLevel(IntEnum):
    """Security levels, lowest first (chasquid's, minus its unused TLS_CLIENT)."""

    PLAIN = 0
    """No TLS."""
    TLS_UNVERIFIED = 1
    """TLS, but the certificate did not verify (or, incoming, any TLS: client certificates
    are not verified)."""
    TLS_VERIFIED = 2
    """TLS with a certificate that verified for the name we connected to (outgoing only)."""

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: object) -> SecLevel:
        try:
            return cls[str(label).upper()]
        except KeyError:
            return cls.PLAIN


def domain_key(domain: str) -> str | None:
    """The key of ``domain`` (canonical, IDNA), or None for a name that cannot be a domain."""
    try:
        name = normalize_domain(domain)
    except AddressError:
        return None
    if not name or name.startswith((".", "[")) or "/" in name:
        return None
    return name


def _record(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


class DomainInfoStore:
    """Remembers, per domain, the highest security level seen in each direction."""

    def __init__(self, state: StateStore | Path, *, incoming: bool = True,
                 outgoing: bool = True, check_interval: float = 0.0) -> None:
        if isinstance(state, Path):  # a folder of files: the local store, kept there
            local = LocalStateStore(state.parent)
            local.set_directory(NAMESPACE, state)
            state = local
        self.state: StateStore = state
        self.incoming_enabled = incoming
        self.outgoing_enabled = outgoing
        self.check_interval = check_interval
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}

    def path(self, domain: str) -> Path | None:
        """The file of ``domain`` with the local store (None: not a domain, or not files)."""
        key = domain_key(domain)
        if key is None or not isinstance(self.state, LocalStateStore):
            return None
        return self.state.path(NAMESPACE, key)

    # ------------------------------------------------------------------ reading

    async def record(self, domain: str) -> dict[str, str]:
        key = domain_key(domain)
        if key is None:
            return {}
        data = _record(await self.state.get(NAMESPACE, key))
        self._remember(key, data)
        return data

    async def level(self, domain: str, direction: Direction) -> SecLevel:
        """The recorded level (PLAIN when nothing is recorded)."""
        return SecLevel.from_label((await self.record(domain)).get(direction, "plain"))

    async def incoming(self, domain: str) -> SecLevel:
        return await self.level(domain, "incoming")

    async def outgoing(self, domain: str) -> SecLevel:
        return await self.level(domain, "outgoing")

    async def domains(self) -> list[str]:
        """Every domain with a record, as recorded."""
        out = []
        for key, value in await self.state.items(NAMESPACE):
            out.append(_record(value).get("domain") or key)
        return sorted(out)

    def _remember(self, key: str, data: dict[str, str]) -> None:
        if len(self._cache) > MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (time.monotonic(), data)

    def cached_level(self, domain: str, direction: Direction) -> SecLevel | None:
        """The level read or written less than ``check_interval`` seconds ago, from memory;
        None when there is none that fresh. A check whose level equals it needs no I/O."""
        key = domain_key(domain)
        entry = self._cache.get(key) if key is not None else None
        if entry is None or time.monotonic() - entry[0] >= self.check_interval:
            return None
        return SecLevel.from_label(entry[1].get(direction, "plain"))

    # ------------------------------------------------------------------ checking

    async def check_incoming(self, domain: str, level: SecLevel) -> bool:
        """Mail from ``domain`` arrived at ``level``: False if that is a downgrade."""
        if not self.incoming_enabled:
            return True
        return await self._check(domain, "incoming", level)

    async def check_outgoing(self, domain: str, level: SecLevel) -> bool:
        """A connection for ``domain`` reached ``level``: False if that is a downgrade."""
        if not self.outgoing_enabled:
            return True
        return await self._check(domain, "outgoing", level)

    async def _check(self, domain: str, direction: Direction, level: SecLevel) -> bool:
        """Compare with the record; raise the record when ``level`` is higher."""
        key = domain_key(domain)
        if key is None:
            return True
        known = SecLevel.PLAIN

        def raise_to(old: Any) -> Any:
            nonlocal known
            data = _record(old)
            known = SecLevel.from_label(data.get(direction, "plain"))
            if level <= known:
                return old
            return {**data, "domain": key, direction: level.label}

        old, new = await update(self.state, NAMESPACE, key, raise_to)
        self._remember(key, _record(new))
        if level < known:
            log.warning("domaininfo: %s security level downgrade for %s: %s < recorded %s",
                        direction, domain, level.label, known.label)
            return False
        if new != old:
            log.info("domaininfo: %s level of %s raised to %s", direction, domain, level.label)
        return True

    async def forget(self, domain: str) -> bool:
        """Remove what is known of ``domain``. True if there was a record."""
        key = domain_key(domain)
        if key is None:
            return False
        self._cache.pop(key, None)
        return await self.state.delete(NAMESPACE, key)


DOMAININFO_STORE: StashKey[DomainInfoStore] = StashKey()
"""Key of the running store in ``ServerContext.stash`` (absent when domaininfo is disabled)."""
