"""A small authoritative DNS server on loopback for tests and benchmarks (UDP and TCP).

    with DNSServer({"example.test": {"MX": ["10 mx1.example.test."], "TXT": ["v=spf1 -all"]},
                    "mx1.example.test": {"A": ["127.0.0.2"]}}) as dns:
        conf = f'dns_servers = ["127.0.0.1:{dns.port}"]'

Records are given per owner name and type as zone-file rdata text. Unknown names answer
NXDOMAIN; known names without the type answer NOERROR with no records. A name listed in
``timeout`` gets no answer at all (for temperror paths). Records can be changed while running
(``dns.set(name, type, [...])``).
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[str, dict[str, list[str]]]


class DNSServer:
    def __init__(self, zone: Zone | None = None, host: str = "127.0.0.1",
                 timeout: set[str] | None = None, authenticated: bool = False,
                 ttl: int = 60) -> None:
        self.zone: Zone = {}
        for name, records in (zone or {}).items():
            for rtype, values in records.items():
                self.set(name, rtype, values)
        self.timeout = {self._key(n) for n in (timeout or set())}
        self.authenticated = authenticated
        """Set the AD bit on answers, as a validating resolver does for signed zones."""
        self.ttl = ttl
        self.servfail: set[str] = set()
        self.host = host
        self.queries: list[tuple[str, str]] = []
        self._udp: socketserver.UDPServer | None = None
        self._tcp: socketserver.TCPServer | None = None

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".") + "."

    def set(self, name: str, rtype: str, values: list[str]) -> None:
        self.zone.setdefault(self._key(name), {})[rtype.upper()] = list(values)

    def answer(self, wire: bytes, udp: bool = False) -> bytes | None:
        query = dns.message.from_wire(wire)
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if self.authenticated:
            resp.flags |= dns.flags.AD
        q = query.question[0]
        name = q.name.to_text().lower()
        rtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rtype))
        if name in self.timeout:
            return None
        if name in {self._key(n) for n in self.servfail}:
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp.to_wire()
        records = self.zone.get(name)
        if records is None:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        else:
            values = records.get(rtype, [])
            if not values and "CNAME" in records and rtype != "CNAME":
                rtype, values = "CNAME", records["CNAME"]
            if values:
                rrset = dns.rrset.from_text_list(q.name, self.ttl, "IN", rtype, values)
                resp.answer.append(rrset)
        out = resp.to_wire()
        if udp and len(out) > 512:  # too big for plain UDP: truncated, ask again over TCP
            resp.answer.clear()
            resp.flags |= dns.flags.TC
            out = resp.to_wire()
        return out

    def __enter__(self) -> DNSServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._udp is not None
        return int(self._udp.server_address[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        outer = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = outer.answer(data, udp=True)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = self.request.recv(2)
                if len(head) < 2:
                    return
                (length,) = struct.unpack("!H", head)
                data = b""
                while len(data) < length:
                    chunk = self.request.recv(length - len(data))
                    if not chunk:
                        return
                    data += chunk
                reply = outer.answer(data)
                if reply is not None:
                    self.request.sendall(struct.pack("!H", len(reply)) + reply)

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class UDP(socketserver.UDPServer):  # answers are instant: no thread per query
            address_family = family
            daemon_threads = True

        class TCP(socketserver.ThreadingTCPServer):
            address_family = family
            daemon_threads = True
            allow_reuse_address = True

        for attempt in range(20):  # the UDP port may be taken for TCP by someone else
            self._udp = UDP((self.host, 0), UDPHandler)
            port = self._udp.server_address[1]
            try:
                self._tcp = TCP((self.host, port), TCPHandler)
                break
            except OSError:
                self._udp.server_close()
                if attempt == 19:
                    raise
        for srv in (self._udp, self._tcp):
            assert srv is not None
            threading.Thread(target=srv.serve_forever, daemon=True,
                             kwargs={"poll_interval": 0.1}).start()

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
