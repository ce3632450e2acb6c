"""Helpers for the MTA-STS, DANE and smarthost tests: an HTTPS policy server on loopback, a
DNS server with AD bit and no caching, TLSA records of trustme certificates, an SMTP relay that
requires AUTH."""

from __future__ import annotations

import http.server
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import AuthResult, LoginPassword

from tampu.testing.dns import DNSServer, Zone, tlsa_rdata
from tampu.testing.mx import MXHandler as Sink
from tampu.testing.mx import closing_controller_class

POLICY_PATH = "/.well-known/mta-sts.txt"


@dataclass
class Served:
    body: bytes
    status: int = 200
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)


class PolicyServer:
    """HTTPS on 127.0.0.1:<port> (certificate from a trustme CA for the given names), serving
    ``policies[host]`` at the well-known path by Host header; records every request."""

    def __init__(self, ca: Any, *names: str, host: str = "127.0.0.1") -> None:
        self.policies: dict[str, Served] = {}
        self.requests: list[tuple[str, str]] = []  # (Host header, path)
        self.sni: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                host = (self.headers.get("Host") or "").split(":")[0]
                outer.requests.append((host, self.path))
                served = outer.policies.get(host) if self.path == POLICY_PATH else None
                if served is None:
                    self.send_error(404)
                    return
                self.send_response(served.status)
                self.send_header("Content-Type", served.content_type)
                self.send_header("Content-Length", str(len(served.body)))
                for key, value in served.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(served.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(ctx)

        def remember_sni(sock: Any, name: str | None, _ctx: Any) -> None:
            outer.sni.append(name)

        ctx.sni_callback = remember_sni

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> Any:
                sock, addr = super().get_request()
                sock.settimeout(5)
                try:
                    return ctx.wrap_socket(sock, server_side=True), addr
                except (OSError, ssl.SSLError):
                    sock.close()
                    raise

        self.httpd = Server((host, 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)

    def serve(self, domain: str, body: str | bytes, **kw: Any) -> None:
        raw = body.encode() if isinstance(body, str) else body
        self.policies[f"mta-sts.{domain}"] = Served(raw, **kw)

    def fetches(self, domain: str) -> int:
        return sum(1 for host, path in self.requests if host == f"mta-sts.{domain}")

    def __enter__(self) -> PolicyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "version: STSv1\r\n" + f"mode: {mode}\r\n" + \
        "".join(f"mx: {m}\r\n" for m in mx) + f"max_age: {max_age}\r\n"


def start_dns(zone: Zone, *, authenticated: bool = False) -> DNSServer:
    """A DNS server whose answers are not cached (TTL 0), so tests may change records."""
    server = DNSServer(zone, authenticated=authenticated, ttl=0)
    server.start()
    return server


def tlsa(cert_pem: bytes, usage: int, selector: int, mtype: int) -> str:
    """The TLSA rdata text of a PEM certificate (the kit's ``tlsa_rdata``)."""
    return tlsa_rdata(cert_pem, usage, selector, mtype)


class _AuthSink(Sink):
    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        return "250 OK"


class AuthRelay:
    """An SMTP relay (aiosmtpd) requiring AUTH over TLS: STARTTLS or implicit TLS."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext, *, implicit: bool = False,
                 users: dict[str, str] | None = None) -> None:
        self.sink = _AuthSink()
        self.users = users or {}
        self.logins: list[tuple[str, bool]] = []

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                          auth_data: Any) -> AuthResult:
            if not isinstance(auth_data, LoginPassword):
                return AuthResult(success=False, handled=False)
            login = auth_data.login.decode()
            ok = self.users.get(login) == auth_data.password.decode()
            self.logins.append((login, ok))
            return AuthResult(success=ok, handled=False)

        kwargs: dict[str, Any] = {"ssl_context": tls} if implicit else \
            {"tls_context": tls, "require_starttls": True}
        self.controller = closing_controller_class()(self.sink, hostname=host, port=port,
                                     server_hostname="relay", ready_timeout=5,
                                     authenticator=authenticator,
                                     # aiosmtpd counts only STARTTLS as TLS for AUTH (and
                                     # warns about AUTH required without it); the implicit-TLS
                                     # listener speaks nothing but TLS, and _AuthSink refuses
                                     # MAIL before AUTH
                                     auth_required=not implicit,
                                     auth_require_tls=not implicit, **kwargs)

    def __enter__(self) -> AuthRelay:
        self.controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.controller.stop()
