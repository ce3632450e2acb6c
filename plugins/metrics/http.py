"""A tiny HTTP/1.0 server on asyncio streams: enough for a Prometheus scrape and a status page.

Only ``GET`` (and ``HEAD``) of a few paths; one request per connection; bounded request size
and time. No dependency beyond the standard library.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger("tampu.plugins.metrics")

Response = tuple[int, str, bytes]
"""(status, content type, body)."""
Route = Callable[[], Awaitable[Response]]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0


class HttpServer:
    """Serves ``routes`` (path -> coroutine returning a Response) on one address."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self._extra: list[asyncio.Server] = []

    @property
    def bound(self) -> tuple[str, int] | None:
        if self.server is None:
            return None
        for sock in self.server.sockets:
            if sock is not None:  # uvloop: None for a listener that is gone
                host, port = sock.getsockname()[:2]
                return str(host), int(port)
        return None

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port``. Raises OSError (EADDRINUSE ...) when it cannot: the
        sockets are bound and listening before the event loop gets them (uvloop drops a
        listen() failure silently, leaving a server without a socket)."""
        socks = await asyncio.to_thread(_listening_sockets, host, port)
        try:
            self.server = await asyncio.start_server(self._client, sock=socks[0],
                                                     limit=MAX_REQUEST)
            extra = [await asyncio.start_server(self._client, sock=s, limit=MAX_REQUEST)
                     for s in socks[1:]]
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        self._extra = extra

    async def stop(self) -> None:
        for server in [self.server, *self._extra]:
            if server is not None:
                server.close()
                await server.wait_closed()
        self.server = None
        self._extra = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body, head_only = await self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            writer.close()
            return
        header = (f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}\r\n"
                  f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                  "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode()
        try:
            writer.write(header + (b"" if head_only else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, bool]:
        if len(head) > MAX_REQUEST:
            return 400, "text/plain", b"request too large\n", False
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return 400, "text/plain", b"bad request\n", False
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n", False
        route = self.routes.get(target.split("?", 1)[0])
        if route is None:
            return 404, "text/plain", b"not found\n", method == "HEAD"
        try:
            status, ctype, body = await route()
        except Exception:
            log.exception("metrics: %s failed", target)
            return 500, "text/plain", b"internal error\n", method == "HEAD"
        return status, ctype, body, method == "HEAD"


def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for ``host:port`` (every address of a name; ``""``: all).
    Raises OSError."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, stype, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, stype, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(128)
            sock.setblocking(False)
            if port == 0:
                break  # an ephemeral port is not the same for two families
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
