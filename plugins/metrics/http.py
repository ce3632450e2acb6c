"""A tiny HTTP/1.0 server on asyncio streams: enough for a Prometheus scrape and a status page.

Only ``GET`` (and ``HEAD``) of a few paths; one request per connection; bounded request size
and time. No dependency beyond the standard library.
"""

from __future__ import annotations

import asyncio
import logging
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

    @property
    def bound(self) -> tuple[str, int] | None:
        if self.server is None or not self.server.sockets:
            return None
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._client, host or None, port,
                                                 reuse_address=True, limit=MAX_REQUEST)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

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
