"""The server's one DNS client: SPF, DKIM, DMARC, MTA-STS, DANE and MX lookups all go here.

* Queries go over UDP through one long-lived socket per name server (no socket and no
  ``os.urandom`` per query, unlike dnspython's resolver); a truncated answer is asked again over
  TCP. Queries are built, and TXT answers read, by :mod:`tampu.dns_wire` (dnspython reads the
  rest). IDs come from a generator seeded once from the system's entropy, and the socket is
  replaced every :data:`SOCKET_ROTATION` queries, so that its source port changes too.
* Answers are cached for their TTL (at most ``max_ttl``); NXDOMAIN and NODATA are cached per
  RFC 2308 only when the server sent an SOA. Concurrent identical queries share one lookup.
* Every query has a bounded time (``timeout``, spread over the servers); a timeout, SERVFAIL
  or REFUSED raises :class:`DnsTempError`, never a silent empty answer.
* The AD bit of an answer is kept (``Answer.authenticated``): with a validating resolver on
  loopback it tells DANE that the TLSA records are DNSSEC-signed (RFC 6698, RFC 7672).

Names may be given in Unicode; they are sent in their IDNA 2008 (``xn--``) form.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
import secrets
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, cast

import dns.exception
import dns.rcode
import dns.rdatatype
from dns.flags import AD, QR, TC
from dns.rdataclass import IN as CLASS_IN
from dns.rdatatype import CNAME

from tampu.dns_wire import Response, decode, make_query, text_form

log = logging.getLogger("tampu.dns")

DEFAULT_MAX_TTL: Final = 300
CACHE_SIZE: Final = 10_000
SOCKET_ROTATION: Final = 2_000
MAX_CNAME_HOPS: Final = 8


class DnsTempError(Exception):
    """The lookup failed for now (timeout, SERVFAIL, REFUSED, garbled answer): try later."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The records of one name and type, as the resolver gave them."""

    name: str
    rdtype: str
    records: tuple[Any, ...] = ()
    """dnspython rdata objects (``.address``, ``.exchange``, ...); TXT records are
    :class:`tampu.dns_wire.TxtRecord` (``.strings`` as dnspython's)."""
    ttl: int = 0
    nxdomain: bool = False
    """The name does not exist (as opposed to existing without records of this type)."""
    authenticated: bool = False
    """The resolver set the AD bit: the answer was DNSSEC-validated."""

    def __bool__(self) -> bool:
        return bool(self.records)

    def texts(self) -> list[str]:
        """TXT records, each one's strings joined (RFC 7208 3.3), decoded leniently."""
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self.records
                if hasattr(r, "strings")]


def parse_server(spec: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address → (host, port).

    Raises ValueError for a bad port or an empty host (``[server] dns_servers``).
    """
    spec = spec.strip()
    if spec.startswith("["):
        host, close, rest = spec[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ValueError(f"{spec!r} is not host, host:port or [v6]:port")
        port = rest[1:] if rest else "53"
    elif spec.count(":") == 1:
        host, _, port = spec.partition(":")
    else:
        host, port = spec, "53"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{spec!r} is not host, host:port or [v6]:port")
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{spec!r}: the DNS server must be an IP address") from None
    return host, int(port)


def system_servers() -> list[tuple[str, int]]:
    """The name servers of /etc/resolv.conf (127.0.0.1 when there are none)."""
    servers: list[tuple[str, int]] = []
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    servers.append((parts[1].split("%", 1)[0], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


def to_ascii(name: str) -> str:
    """A DNS name for the wire: IDNA 2008 A-labels, no trailing dot. Raises ValueError."""
    name = name.rstrip(".")
    if name.isascii():
        return name.lower()
    from tampu.addresses import domain_to_ascii

    return domain_to_ascii(name)


class _Udp(asyncio.DatagramProtocol):
    """One connected UDP socket to one server; answers are matched to waiters by ID."""

    def __init__(self, client: Resolver) -> None:
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            return
        (qid,) = struct.unpack_from("!H", data)
        fut = self.waiting.pop(qid, None)
        if fut is not None and not fut.done():
            fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(DnsTempError(f"DNS socket error: {exc}"))
        self.waiting.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(DnsTempError("DNS socket closed"))
        self.waiting.clear()


class Resolver:
    """An asynchronous stub resolver with a TTL cache, shared by everything in one process."""

    def __init__(self, servers: Sequence[tuple[str, int]] = (), *, timeout: float = 5.0,
                 max_ttl: int = DEFAULT_MAX_TTL, cache_size: int = CACHE_SIZE) -> None:
        self.servers = list(servers) or system_servers()
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, str], tuple[float, Answer]] = \
            collections.OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[Answer]] = {}
        self._sockets: dict[tuple[str, int], _Udp] = {}
        self._random = random.Random(secrets.randbits(64))
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, servers: Sequence[str], timeout: float) -> Resolver:
        """For ``[server] dns_servers`` (empty: /etc/resolv.conf) and ``dns_timeout``."""
        return cls([parse_server(s) for s in servers], timeout=timeout)

    # ------------------------------------------------------------------ public

    async def query(self, name: str, rdtype: str) -> Answer:
        """The records of ``name`` and ``rdtype`` (CNAMEs followed). Raises DnsTempError,
        or ValueError for a name that cannot be a DNS name."""
        qname = to_ascii(name)
        rdtype = rdtype.upper()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests, forked workers): new sockets
            self._sockets.clear()
            self._inflight.clear()
            self._loop = loop
        key = (qname, rdtype)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Answer] = loop.create_future()
        self._inflight[key] = fut
        try:
            answer = await self._resolve(qname, rdtype)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else DnsTempError("cancelled"))
                fut.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(answer)
        return answer

    def cached_until(self, name: str, rdtype: str) -> float:
        """When the cached answer for ``name`` and ``rdtype`` expires (``time.monotonic``
        seconds), 0.0 when none is cached: a result computed from cached answers holds as
        long as all of them do."""
        try:
            key = (to_ascii(name), rdtype.upper())
        except ValueError:
            return 0.0
        cached = self._cache.get(key)
        return cached[0] if cached is not None else 0.0

    async def txt(self, name: str) -> list[str]:
        return (await self.query(name, "TXT")).texts()

    def clear(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        for proto in self._sockets.values():
            if proto.transport is not None:
                proto.transport.close()
        self._sockets.clear()

    # ------------------------------------------------------------------ resolution

    async def _resolve(self, qname: str, rdtype: str) -> Answer:
        name = qname
        for _ in range(MAX_CNAME_HOPS):
            msg = await self._exchange(name, rdtype)
            answer, target = self._extract(msg, name, rdtype, qname)
            if target is None:
                self._store((qname, rdtype), answer)
                return answer
            name = target  # a CNAME whose target the server did not include
        raise DnsTempError(f"too many CNAMEs resolving {qname} {rdtype}")

    def _extract(self, msg: Response, name: str, rdtype: str,
                 qname: str) -> tuple[Answer, str | None]:
        authenticated = bool(msg.flags & AD)
        if msg.rcode == dns.rcode.NXDOMAIN:
            return Answer(qname, rdtype, (), self._negative_ttl(msg), True, authenticated), None
        if msg.rcode != dns.rcode.NOERROR:
            raise DnsTempError(f"{_rcode_text(msg.rcode)} looking up {name} {rdtype}")
        wanted = _type_code(rdtype)
        owner = text_form(name)
        seen = 0
        while seen < MAX_CNAME_HOPS:
            found = [(ttl, rd) for o, t, c, ttl, rd in msg.answer
                     if o == owner and t == wanted and c == CLASS_IN]
            if found:
                ttl = min(min(t for t, _ in found), self.max_ttl)
                return Answer(qname, rdtype, tuple(rd for _, rd in found), ttl, False,
                              authenticated), None
            target = next((rd for o, t, c, _, rd in msg.answer
                           if o == owner and t == CNAME and c == CLASS_IN), None) \
                if wanted != CNAME else None
            if target is None:
                break
            owner = target
            seen += 1
        if seen:  # the chain ended at a name the answer has no records for: ask for it
            return Answer(qname, rdtype), owner
        return Answer(qname, rdtype, (), self._negative_ttl(msg), False, authenticated), None

    def _negative_ttl(self, msg: Response) -> int:
        if msg.soa is None:
            return 0  # RFC 2308: no SOA, no negative caching
        return min(msg.soa[0], msg.soa[1], self.max_ttl)

    def _store(self, key: tuple[str, str], answer: Answer) -> None:
        if answer.ttl <= 0:
            return
        self._cache[key] = (time.monotonic() + answer.ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # ------------------------------------------------------------------ transport

    async def _exchange(self, name: str, rdtype: str) -> Response:
        code = _type_code(rdtype)
        query = make_query(name, code, 0)  # a name dnspython refuses fails here, at once
        deadline = time.monotonic() + self.timeout
        per_try = self.timeout / max(2, len(self.servers))
        last: Exception | None = None
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            server = self.servers[attempt % len(self.servers)]
            attempt += 1
            qid = self._random.getrandbits(16)
            wire = struct.pack("!H", qid) + query[2:]
            try:
                data, qid = await self._udp(server, wire, qid, min(per_try, remaining))
                msg = decode(data, code)
                if not _matches(msg, qid, name, code):
                    last = DnsTempError("answer does not match the question")
                    continue
                if msg.flags & TC:
                    msg = await self._tcp(server, struct.pack("!H", qid) + wire[2:], name,
                                          code, max(0.1, deadline - time.monotonic()))
                if msg.rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED) and \
                        attempt < 2 * len(self.servers):
                    last = DnsTempError(f"{_rcode_text(msg.rcode)} from {server[0]}")
                    continue
                return msg
            except TimeoutError:
                last = DnsTempError(f"DNS timeout looking up {name} {rdtype}")
            except (DnsTempError, OSError, dns.exception.DNSException) as exc:
                last = exc if isinstance(exc, DnsTempError) else DnsTempError(
                    f"DNS error looking up {name} {rdtype}: {exc}")
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        raise last or DnsTempError(f"DNS timeout looking up {name} {rdtype}")

    async def _socket(self, server: tuple[str, int]) -> _Udp:
        proto = self._sockets.get(server)
        loop = asyncio.get_running_loop()
        if proto is not None and (proto.transport is None or
                                  (proto.sent >= SOCKET_ROTATION and not proto.waiting)):
            if proto.transport is not None:
                proto.transport.close()
            proto = None
        if proto is None:
            found = self._sockets.get(server)
            _, made = await loop.create_datagram_endpoint(lambda: _Udp(self),
                                                          remote_addr=server)
            current = self._sockets.get(server)
            if current is not None and current is not found and current.transport is not None:
                if made.transport is not None:  # a concurrent query made one: keep one socket
                    made.transport.close()
                return current
            proto = made
            self._sockets[server] = proto
        return proto

    async def _udp(self, server: tuple[str, int], wire: bytes, qid: int,
                   limit: float) -> tuple[bytes, int]:
        """The answer to ``wire``, and the ID it went with (another if ``qid`` is in use)."""
        proto = await self._socket(server)
        while qid in proto.waiting:
            qid = (qid + 1) & 0xFFFF
            wire = struct.pack("!H", qid) + wire[2:]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        proto.waiting[qid] = fut
        assert proto.transport is not None
        proto.transport.sendto(wire)
        proto.sent += 1
        timer = loop.call_later(limit, _expire, fut)  # cheaper than asyncio.timeout
        try:
            return await fut, qid
        finally:
            timer.cancel()
            proto.waiting.pop(qid, None)

    async def _tcp(self, server: tuple[str, int], wire: bytes, name: str, code: int,
                   limit: float) -> Response:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(*server)
            try:
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                data = await reader.readexactly(length)
            finally:
                writer.close()
        msg = decode(data, code)
        if not _matches(msg, struct.unpack_from("!H", wire)[0], name, code):
            raise DnsTempError("TCP answer does not match the question")
        return msg


_K = TypeVar("_K")
_V = TypeVar("_V")


class DerivedCache(Generic[_K, _V]):
    """Results computed from DNS answers (an SPF evaluation, a DMARC policy), each kept until
    the first of the answers it used expires in the resolver's cache: never longer than the
    answers themselves, and not at all when one has TTL 0 or failed (the caller does not put
    those). At most ``limit`` results: expired ones go first, then all."""

    def __init__(self, resolver: Resolver, limit: int = 10_000,
                 no_lookup_seconds: float = 60.0) -> None:
        self.resolver = resolver
        self.limit = limit
        self.no_lookup_seconds = no_lookup_seconds
        """How long a result that needed no lookup (a malformed name) is kept."""
        self._kept: dict[_K, tuple[float, _V]] = {}

    def get(self, key: _K) -> _V | None:
        kept = self._kept.get(key)
        if kept is None:
            return None
        if kept[0] > time.monotonic():
            return kept[1]
        del self._kept[key]
        return None

    def put(self, key: _K, value: _V, used: Iterable[tuple[str, str]]) -> None:
        """Keep ``value``, computed from the answers to ``used`` ((name, rdtype) pairs)."""
        now = time.monotonic()
        until = min((self.resolver.cached_until(n, t) for n, t in used),
                    default=now + self.no_lookup_seconds)
        if until <= now:
            return
        if len(self._kept) >= self.limit:
            self._kept = {k: v for k, v in self._kept.items() if v[0] > now}
            if len(self._kept) >= self.limit:
                self._kept.clear()
        self._kept[key] = (until, value)


def _expire(fut: asyncio.Future[bytes]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


def _rcode_text(rcode: int) -> str:
    try:
        return dns.rcode.to_text(dns.rcode.Rcode(rcode))
    except ValueError:
        return f"RCODE{rcode}"


@functools.cache
def _type_code(rdtype: str) -> int:
    return int(dns.rdatatype.from_text(rdtype))


def _matches(msg: Response, qid: int, name: str, code: int) -> bool:
    if msg.id != qid or not msg.flags & QR:
        return False
    if msg.question is None:
        return msg.rcode != dns.rcode.NOERROR  # some servers drop it on errors
    return msg.question == (text_form(name), code)
