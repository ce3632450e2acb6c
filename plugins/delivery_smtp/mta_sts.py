"""MTA-STS (RFC 8461) for outgoing mail: discovery, HTTPS policy fetch, parsing and a disk cache.

A recipient domain announces a policy with a TXT record ``_mta-sts.<domain>`` (``v=STSv1;
id=...``) and serves it at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``::

    version: STSv1
    mode: enforce
    mx: mail.example.com
    mx: *.example.net
    max_age: 604800

:class:`MtaSts` answers "which policy applies to this domain now" (:meth:`MtaSts.policy`):

* the TXT record is looked up on every call (through the server's DNS client, whose cache keeps
  it for its TTL); a policy is fetched when none is cached, when the cached one expired, when
  the record's ``id`` differs from the cached policy's, and (proactively, inline) when more than
  half of the cached policy's ``max_age`` has passed;
* policies are cached in ``<directory>/<domain>.json`` for ``max_age`` (RFC 8461 5.1), so they
  survive restarts; a failed fetch keeps using an unexpired cached policy, and without one the
  domain is treated as having no policy (RFC 8461 5);
* a failed fetch is not retried for the same ``id`` within :data:`RETRY_AFTER_FAILURE` seconds
  (the RFC's suggestion), so a queue of messages for a domain with a dead policy host does not
  wait on it once per message;
* the policy host's name is resolved through the server's DNS client too (``[server]
  dns_servers``), and the connection is made to that address with the policy host's name as
  SNI and as the name its certificate must be valid for. Redirects are not followed, the body is
  at most :data:`POLICY_MAX_BYTES`, the media type must be ``text/plain`` (RFC 8461 3.3), and the
  whole fetch has a time bound.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast
from urllib.parse import quote

from tampu.dns import DnsTempError, Resolver, to_ascii
from tampu.files import write_durably

log = logging.getLogger("tampu.plugins.delivery_smtp.mta_sts")

Mode = Literal["enforce", "testing", "none"]
MODES: Final = ("enforce", "testing", "none")
POLICY_MAX_BYTES: Final = 64 * 1024
"""Largest policy body accepted (the usual limit of implementations; RFC 8461 3.3 asks for one)."""
MAX_AGE_LIMIT: Final = 31_557_600
"""RFC 8461 3.2: max_age is at most 31557600 seconds (about a year); larger values are capped."""
RETRY_AFTER_FAILURE: Final = 300.0
"""Seconds before a policy whose fetch failed is fetched again for the same id (RFC 8461 3.3)."""
WELL_KNOWN: Final = "/.well-known/mta-sts.txt"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class PolicyError(ValueError):
    """The policy text is not a valid STSv1 policy."""


class FetchError(Exception):
    """The policy could not be fetched (DNS, connection, TLS, HTTP status, type, size, time)."""


# ---------------------------------------------------------------------------- parsing


def parse_txt(texts: Iterable[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None when there is no valid record.

    RFC 8461 3.1: records not starting with ``v=STSv1`` are discarded; exactly one must remain,
    with fields ``key=value`` separated by ``;``, ``v`` first and an ``id`` of 1 to 32
    letters and digits. Anything else means "no policy".
    """
    candidates = [t for t in texts if t.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing ";" is allowed
    if not fields or fields[0] != "v=STSv1":
        return None
    found: str | None = None
    for field in fields[1:]:
        key, eq, value = field.partition("=")
        if not eq or not key:
            return None
        if key == "id":
            if found is not None or not _ID.fullmatch(value):
                return None
            found = value
    return found


def normalize_host(name: str) -> str | None:
    """A host name in lower-case A-label form without the final dot, or None if it is none."""
    name = name.strip().rstrip(".")
    try:
        ascii_name = to_ascii(name)
    except (ValueError, UnicodeError):
        return None
    labels = ascii_name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return ascii_name


def _mx_pattern(value: str) -> str:
    wildcard = value.startswith("*.")
    host = normalize_host(value[2:] if wildcard else value)
    if host is None:
        raise PolicyError(f"bad mx pattern {value!r}")
    return f"*.{host}" if wildcard else host


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: ``host`` matches ``pattern`` exactly, or ``*.rest`` with one label more.

    ``*.example.com`` matches ``mx.example.com`` but neither ``example.com`` nor
    ``a.b.example.com``. Both are compared in lower-case A-label form.
    """
    name = normalize_host(host)
    if name is None:
        return False
    if pattern.startswith("*."):
        first, dot, rest = name.partition(".")
        return bool(dot) and bool(first) and rest == pattern[2:]
    return name == pattern


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed STSv1 policy."""

    mode: Mode
    mx: tuple[str, ...]
    """MX host patterns in normalized form (``mx.example.com``, ``*.example.net``)."""
    max_age: int

    def allows(self, host: str) -> bool:
        """Whether the MX host ``host`` matches one of the policy's patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def to_text(self) -> str:
        lines = ["version: STSv1", f"mode: {self.mode}", *(f"mx: {mx}" for mx in self.mx),
                 f"max_age: {self.max_age}"]
        return "\r\n".join(lines) + "\r\n"

    def to_json(self) -> dict[str, Any]:
        return {"version": "STSv1", "mode": self.mode, "mx": list(self.mx),
                "max_age": self.max_age}

    @classmethod
    def from_json(cls, data: Any) -> Policy:
        if not isinstance(data, dict) or data.get("version") != "STSv1":
            raise PolicyError("not an STSv1 policy")
        mode, mx, max_age = data.get("mode"), data.get("mx"), data.get("max_age")
        if mode not in MODES or not isinstance(mx, list) or not isinstance(max_age, int) \
                or isinstance(max_age, bool) or not 0 <= max_age <= MAX_AGE_LIMIT:
            raise PolicyError("bad cached policy")
        return cls(mode=cast("Mode", mode), mx=tuple(_mx_pattern(str(m)) for m in mx),
                   max_age=max_age)


def parse_policy(text: str) -> Policy:
    """Parse a policy body (RFC 8461 3.2). Raises PolicyError.

    Lines end in CRLF or LF; each is ``key: value`` (whitespace after the colon and at the end
    is ignored). ``version`` (``STSv1``), ``mode`` and ``max_age`` are required, ``mx`` at least
    once unless the mode is ``none``; unknown keys are ignored; of a repeated single-valued key
    the first counts.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.rstrip(" \t")
        if not line:
            continue
        key, colon, value = line.partition(":")
        if not colon or not key or key != key.strip():
            raise PolicyError(f"bad policy line {line[:80]!r}")
        value = value.lstrip(" \t")
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = fields.get("mode")
    if mode not in MODES:
        raise PolicyError(f"bad mode {mode!r}")
    max_age_text = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(max_age_text):
        raise PolicyError(f"bad max_age {max_age_text!r}")
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} without mx patterns")
    return Policy(mode=cast("Mode", mode), mx=tuple(mx),
                  max_age=min(int(max_age_text), MAX_AGE_LIMIT))


# ---------------------------------------------------------------------------- the cache


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A policy as fetched for one domain, with the TXT id it was fetched under."""

    domain: str
    id: str
    policy: Policy
    fetched: float
    """Unix time of the fetch."""

    @property
    def expires(self) -> float:
        return self.fetched + self.policy.max_age

    def fresh(self, now: float) -> bool:
        return now < self.expires

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "id": self.id, "fetched": self.fetched,
                "expires": self.expires, "policy": self.policy.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> CachedPolicy:
        if not isinstance(data, dict):
            raise PolicyError("not a cached policy")
        domain, pid, fetched = data.get("domain"), data.get("id"), data.get("fetched")
        if not isinstance(domain, str) or not isinstance(pid, str) or \
                not isinstance(fetched, int | float) or isinstance(fetched, bool):
            raise PolicyError("bad cached policy")
        return cls(domain=domain, id=pid, policy=Policy.from_json(data.get("policy")),
                   fetched=float(fetched))


class PolicyCache:
    """Policies on disk: ``<directory>/<domain>.json``, replaced atomically (blocking I/O)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, domain: str) -> Path | None:
        name = normalize_host(domain)
        if name is None:
            return None
        return self.directory / (quote(name, safe="-_.") + ".json")

    def load(self, domain: str) -> CachedPolicy | None:
        path = self.path(domain)
        if path is None:
            return None
        try:
            entry = CachedPolicy.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("MTA-STS: ignoring the unreadable cached policy %s (%s)", path, exc)
            return None
        return entry if entry.domain == normalize_host(domain) else None

    def store(self, entry: CachedPolicy) -> None:
        path = self.path(entry.domain)
        if path is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_durably(path, [json.dumps(entry.to_json(), sort_keys=True).encode() + b"\n"])


# ---------------------------------------------------------------------------- fetching

Fetch = Callable[[str], Awaitable[str]]
"""``fetch(domain)`` → the policy text of ``domain``; raises FetchError."""


class PolicyFetcher:
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with httpx.

    The policy host is resolved with ``resolver``; each of its addresses (at most three) is
    tried in turn within ``timeout`` seconds for the whole fetch. ``port`` is 443 except in
    tests. The certificate must verify for ``mta-sts.<domain>`` (``tls``).
    """

    def __init__(self, resolver: Resolver, *, tls: ssl.SSLContext, port: int = 443,
                 timeout: float = 60.0, max_bytes: int = POLICY_MAX_BYTES) -> None:
        self.resolver = resolver
        self.tls = tls
        self.port = port
        self.timeout = timeout
        self.max_bytes = max_bytes

    async def __call__(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(self.timeout):
                addresses = await self._addresses(host)
                problems: list[str] = []
                for address in addresses[:3]:
                    try:
                        return await self._get(host, address)
                    except FetchError as exc:
                        problems.append(str(exc))
                raise FetchError("; ".join(problems))
        except TimeoutError:
            raise FetchError(f"fetching https://{host}{WELL_KNOWN} took longer than "
                             f"{self.timeout:g}s") from None

    async def _addresses(self, host: str) -> list[str]:
        addresses: list[str] = []
        problems: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.query(host, rdtype)
            except DnsTempError as exc:
                problems.append(str(exc))
                continue
            if answer.nxdomain:
                raise FetchError(f"{host} does not exist")
            addresses.extend(r.address for r in answer.records if hasattr(r, "address"))
        if not addresses:
            raise FetchError("; ".join(problems) or f"{host} has no address")
        return addresses

    async def _get(self, host: str, address: str) -> str:
        import httpx  # at the first policy fetch: most processes never fetch one

        literal = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        url = f"https://{literal}:{self.port}{WELL_KNOWN}"
        where = f"https://{host}{WELL_KNOWN} ({address})"
        try:
            async with httpx.AsyncClient(verify=self.tls, follow_redirects=False,
                                         trust_env=False, http2=False,
                                         timeout=httpx.Timeout(self.timeout)) as client:
                async with client.stream("GET", url, headers={"Host": host,
                                                              "Accept": "text/plain"},
                                         extensions={"sni_hostname": host}) as resp:
                    if resp.status_code != 200:
                        raise FetchError(f"{where}: HTTP {resp.status_code} (only 200 counts; "
                                         "redirects are not followed)")
                    ctype = resp.headers.get("content-type", "")
                    if ctype.split(";", 1)[0].strip().lower() != "text/plain":
                        raise FetchError(f"{where}: content type {ctype or 'missing'!s}, "
                                         "not text/plain")
                    body = bytearray()
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_bytes:
                            raise FetchError(f"{where}: policy larger than "
                                             f"{self.max_bytes} bytes")
        except httpx.HTTPError as exc:
            raise FetchError(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError(f"{where}: the policy is not UTF-8 text") from None


# ---------------------------------------------------------------------------- the policy source


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """The policy that applies to one delivery (never mode ``none``)."""

    domain: str
    id: str
    policy: Policy

    @property
    def mode(self) -> Mode:
        return self.policy.mode

    @property
    def label(self) -> str:
        """``MTA-STS policy for example.com (enforce)``, the start of every message about it."""
        return f"MTA-STS policy for {self.domain} ({self.mode})"

    def allows(self, host: str) -> bool:
        return self.policy.allows(host)


class MtaSts:
    """Which MTA-STS policy applies to a recipient domain, with caching (see the module)."""

    def __init__(self, resolver: Resolver, cache: PolicyCache, fetch: Fetch, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.cache = cache
        self.fetch = fetch
        self.clock = clock
        self._memory: dict[str, CachedPolicy | None] = {}
        self._failed: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy to apply to mail for ``domain`` now; None: none (or mode ``none``)."""
        name = normalize_host(domain)
        if name is None:
            return None
        if len(self._locks) > 10_000:
            self._locks.clear()
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # one lookup and fetch per domain at a time
            entry = await self._current(name)
        if entry is None or entry.policy.mode == "none":
            return None
        return StsPolicy(domain=name, id=entry.id, policy=entry.policy)

    async def cached(self, domain: str) -> CachedPolicy | None:
        """The cached entry of ``domain`` (memory, else disk), expired or not."""
        if domain not in self._memory:
            if len(self._memory) > 10_000:
                self._memory.clear()
            self._memory[domain] = await asyncio.to_thread(self.cache.load, domain)
        return self._memory[domain]

    async def _current(self, domain: str) -> CachedPolicy | None:
        now = self.clock()
        try:
            txt_id = parse_txt(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DnsTempError as exc:
            log.info("MTA-STS: TXT lookup for %s failed (%s); using the cached policy if any",
                     domain, exc)
            txt_id = None
        cached = await self.cached(domain)
        fresh = cached if cached is not None and cached.fresh(now) else None
        if txt_id is None:
            return fresh  # no live record: an unexpired cached policy still applies (5.1)
        if fresh is not None and fresh.id == txt_id and \
                now < fresh.fetched + fresh.policy.max_age / 2:
            return fresh
        failed = self._failed.get(domain)
        if failed is not None and failed[0] == txt_id and now < failed[1]:
            return fresh
        try:
            policy = parse_policy(await self.fetch(domain))
        except (FetchError, PolicyError) as exc:
            self._failed[domain] = (txt_id, now + RETRY_AFTER_FAILURE)
            if len(self._failed) > 10_000:
                self._failed.clear()
            if fresh is not None:
                log.warning("MTA-STS: cannot fetch the policy of %s (id %s): %s; using the "
                            "cached policy (id %s, %s) until it expires", domain, txt_id, exc,
                            fresh.id, fresh.policy.mode)
            else:
                log.warning("MTA-STS: cannot fetch the policy of %s (id %s): %s; delivering "
                            "as if the domain had no policy", domain, txt_id, exc)
            return fresh
        self._failed.pop(domain, None)
        entry = CachedPolicy(domain=domain, id=txt_id, policy=policy, fetched=now)
        self._memory[domain] = entry
        try:
            await asyncio.to_thread(self.cache.store, entry)
        except OSError as exc:
            log.warning("MTA-STS: cannot cache the policy of %s: %s", domain, exc)
        if cached is None or cached.id != txt_id or cached.policy != policy:
            log.info("MTA-STS: policy of %s (id %s): mode %s, mx %s, max_age %d", domain,
                     txt_id, policy.mode, ", ".join(policy.mx) or "-", policy.max_age)
        return entry
