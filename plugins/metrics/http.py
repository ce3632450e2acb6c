"""A tiny HTTP/1.0 server on asyncio streams: enough for a Prometheus scrape and the console.

Only ``GET`` (and ``HEAD``) of a few paths, with a query string; one request per connection.
Bounded: the request head (``MAX_REQUEST`` bytes, read within ``REQUEST_TIMEOUT``), the query
(``MAX_FIELDS`` fields), the time to answer and send (``RESPONSE_TIMEOUT``) and the
connections served at once (``MAX_CLIENTS``; more get ``503``). No dependency beyond the
standard library.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger("tampu.plugins.metrics")

Response = tuple[int, str, bytes]
"""(status, content type, body)."""


@dataclass(frozen=True, slots=True)
class Request:
    """What a route gets: the method, the path and the query (percent-decoded)."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    """The first value of each query field."""
    headers: dict[str, str] = field(default_factory=dict)
    """Header fields by lower-case name (the last one of each name)."""

    def param(self, name: str, default: str = "") -> str:
        return self.query.get(name, default)

    @property
    def host(self) -> str:
        """The Host header without its port (``[::1]`` as ``::1``), lower-case."""
        value = self.headers.get("host", "").strip().lower()
        if value.startswith("["):
            return value[1:].partition("]")[0]
        return value.rpartition(":")[0] if value.count(":") == 1 else value


Route = Callable[[Request], Awaitable[Response]]

_REASONS: Final = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                   405: "Method Not Allowed", 431: "Request Header Fields Too Large",
                   500: "Internal Server Error", 503: "Service Unavailable"}
MAX_REQUEST: Final = 8192
MAX_FIELDS: Final = 20
MAX_CLIENTS: Final = 32
REQUEST_TIMEOUT: Final = 10.0
RESPONSE_TIMEOUT: Final = 30.0
_HTML_POLICY: Final = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
"""No script runs on a page of this server, whatever got into it (defence in depth for
the HTML escaping of what comes from mail)."""


def parse_head(head: bytes) -> Request | tuple[int, bytes]:
    """The request line and header fields, or (status, message) for a bad request."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400, b"bad request\n"
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return 405, b"only GET\n"
    split = urllib.parse.urlsplit(target)
    try:
        pairs = urllib.parse.parse_qsl(split.query, max_num_fields=MAX_FIELDS,
                                       errors="replace")
    except ValueError:
        return 400, b"too many query fields\n"
    query: dict[str, str] = {}
    for key, value in pairs:
        query.setdefault(key, value)
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Request(method, urllib.parse.unquote(split.path or "/"), query, headers)


class HttpServer:
    """Serves ``routes`` (path -> coroutine taking a Request) on one address."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self._extra: list[asyncio.Server] = []
        self.clients = 0

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
        self.clients += 1
        try:
            if self.clients > MAX_CLIENTS:
                await self._send(writer, 503, "text/plain", b"busy\n", False)
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await self._send(writer, 431, "text/plain", b"request too large\n", False)
                return
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            async with asyncio.timeout(RESPONSE_TIMEOUT):
                status, ctype, body, head_only = await self._respond(head)
                await self._send(writer, status, ctype, body, head_only)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.clients -= 1
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes,
                    head_only: bool) -> None:
        extra = ""
        if ctype.startswith("text/html"):
            extra = (f"Content-Security-Policy: {_HTML_POLICY}\r\nX-Frame-Options: DENY\r\n"
                     "Referrer-Policy: no-referrer\r\n")
        if status == 405:
            extra += "Allow: GET, HEAD\r\n"
        header = (f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}\r\n"
                  f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                  f"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{extra}"
                  "Connection: close\r\n\r\n").encode()
        writer.write(header + (b"" if head_only else body))
        await writer.drain()

    async def _respond(self, head: bytes) -> tuple[int, str, bytes, bool]:
        request = parse_head(head)
        if not isinstance(request, Request):
            status, message = request
            return status, "text/plain", message, False
        head_only = request.method == "HEAD"
        route = self.routes.get(request.path)
        if route is None:
            return 404, "text/plain", b"not found\n", head_only
        try:
            status, ctype, body = await route(request)
        except Exception:
            log.exception("metrics: %s failed", request.path)
            return 500, "text/plain", b"internal error\n", head_only
        return status, ctype, body, head_only


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
