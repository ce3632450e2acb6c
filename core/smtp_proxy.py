"""The PROXY protocol (v1 and v2, parsed by aiosmtpd) for listeners behind a load balancer.

Only trusted source addresses may send a PROXY header; the client address it reports becomes
the session's peer, so plugins (SPF, logs, limits) see the real client.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

from aiosmtpd.proxy_protocol import AF, V2_CMD, ProxyData, get_proxy
from aiosmtpd.smtp import SMTP

from tampu.envelope import ListenerInfo, Session

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("tampu.smtp")

PROXY_TIMEOUT = 10.0
"""Seconds a trusted proxy has to send its PROXY header."""
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyMixin(SMTP):
    """Reads and applies the PROXY header before the greeting; mixed into TampuSMTP."""

    tsession: Session | None
    listener: ListenerInfo
    proxy_trusted: list[IPNetwork]
    _reader: asyncio.StreamReader

    async def _proxy_handshake(self) -> bool:
        """Read the PROXY header of a trusted proxy (aiosmtpd parses v1 and v2)."""
        assert self.tsession is not None
        sid, peer = self.tsession.id, self.tsession.peer_host
        if not _trusted(peer, self.proxy_trusted):
            log.warning("session %s: %s is not a trusted proxy for listener %s; closed", sid,
                        peer, self.listener.name)
            return False
        self._reset_timeout(self._proxy_timeout)
        try:
            data = await get_proxy(self._reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("session %s: proxy %s closed before its PROXY header", sid, peer)
            return False
        if self.session is not None:
            self.session.proxy_data = data
        if not data.valid:
            log.warning("session %s: invalid PROXY header from %s: %s", sid, peer,
                        data.error or "unrecognized")
            return False
        accepted = await self._call_handler_hook("PROXY", data) is True
        self._reset_timeout()
        return accepted

    def _proxy(self, data: ProxyData) -> bool:
        """Adopt the client address the proxy reports (LOCAL/UNKNOWN: keep the proxy's)."""
        assert self.tsession is not None
        proxy = f"{self.tsession.peer_host}:{self.tsession.peer_port}"
        if (data.command == V2_CMD.LOCAL or data.family in (AF.UNSPEC, AF.UNIX)
                or not isinstance(data.src_addr, ipaddress.IPv4Address | ipaddress.IPv6Address)):
            log.info("session %s: PROXY v%s without a client address from %s (health check)",
                     self.tsession.id, data.version, proxy)
            return True
        self.tsession.peer_host = str(data.src_addr)
        self.tsession.peer_port = int(data.src_port or 0)
        log.info("session %s: PROXY v%s: client %s:%d via %s", self.tsession.id, data.version,
                 self.tsession.peer_host, self.tsession.peer_port, proxy)
        return True


def _trusted(host: str, networks: list[IPNetwork]) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return any(addr in net for net in networks)
