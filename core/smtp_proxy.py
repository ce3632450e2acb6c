"""The PROXY protocol (v1 and v2) for listeners behind a load balancer.

Only trusted source addresses may send a PROXY header; the client address it reports becomes
the session's peer, so plugins (SPF, logs, limits) see the real client. The header itself is
parsed by aiosmtpd's ``proxy_protocol.get_proxy`` (a documented, self-contained function;
``tests/core/test_aiosmtpd_compat.py`` checks the parts tampu relies on).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Protocol

from tampu.envelope import ListenerInfo, Session

log = logging.getLogger("tampu.smtp")

PROXY_TIMEOUT = 10.0
"""Seconds a trusted proxy has to send its PROXY header."""
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxiedConnection(Protocol):
    """What reading the PROXY header needs of the session."""

    session: Session | None
    listener: ListenerInfo
    proxy_trusted: list[IPNetwork] | None
    loop: asyncio.AbstractEventLoop

    async def read_exactly(self, n: int, deadline: float) -> bytes: ...

    async def read_until(self, separator: bytes, deadline: float) -> bytes: ...


class _Reader:
    """aiosmtpd's AsyncReader protocol over the session's bounded input."""

    def __init__(self, conn: ProxiedConnection) -> None:
        self.conn = conn

    async def readexactly(self, n: int) -> bytes:
        return await self.conn.read_exactly(n, self.conn.loop.time() + PROXY_TIMEOUT)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        return await self.conn.read_until(separator, self.conn.loop.time() + PROXY_TIMEOUT)

    async def read(self, n: int = -1) -> bytes:
        return await self.conn.read_exactly(max(1, n), self.conn.loop.time() + PROXY_TIMEOUT)


async def read_proxy_header(conn: ProxiedConnection) -> bool:
    """Read the PROXY header of a trusted proxy and adopt the client address it reports.
    False: the connection must be closed (untrusted source, no valid header)."""
    # imported here: aiosmtpd's parser and its attrs and atpublic (~1 MiB) are only needed
    # by the listeners that take PROXY headers
    from aiosmtpd.proxy_protocol import AF, V2_CMD, get_proxy

    session = conn.session
    assert session is not None and conn.proxy_trusted is not None
    sid, peer = session.id, session.peer_host
    if not trusted(peer, conn.proxy_trusted):
        log.warning("session %s: %s is not a trusted proxy for listener %s; closed", sid, peer,
                    conn.listener.name)
        return False
    try:
        data = await get_proxy(_Reader(conn))
    except (asyncio.IncompleteReadError, ConnectionError, EOFError):
        data = None
    if data is None or not data.valid:
        why = "closed before its PROXY header" if data is None else \
            f"sent an invalid PROXY header: {data.error or 'unrecognized'}"
        log.warning("session %s: proxy %s %s", sid, peer, why)
        return False
    proxy = f"{peer}:{session.peer_port}"
    if (data.command == V2_CMD.LOCAL or data.family in (AF.UNSPEC, AF.UNIX)
            or not isinstance(data.src_addr, ipaddress.IPv4Address | ipaddress.IPv6Address)):
        log.info("session %s: PROXY v%s without a client address from %s (health check)",
                 sid, data.version, proxy)
        return True
    session.peer_host = str(data.src_addr)
    session.peer_port = int(data.src_port or 0)
    log.info("session %s: PROXY v%s: client %s:%d via %s", sid, data.version,
             session.peer_host, session.peer_port, proxy)
    return True


def trusted(host: str, networks: list[IPNetwork]) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return any(addr in net for net in networks)
