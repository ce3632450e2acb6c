"""A small authoritative DNS server on loopback for tests (UDP and TCP), with zone helpers.

    with DNSServer({"example.test": {"MX": ["10 mx1.example.test."]},
                    "mx1.example.test": {"A": ["127.0.0.2"]}}) as dns:
        dns.spf("example.org", "ip4:127.0.0.1 -all")
        key = dns.dkim("example.org", "sel")          # a key pair, its TXT record published
        conf = dns.conf_line                            # dns_servers = ["127.0.0.1:<port>"]

Records are given per owner name and type as zone-file rdata text (a TXT record's text must be
quoted there: ``'"v=spf1 -all"'``; the helpers quote for you). Unknown names answer NXDOMAIN;
known names without the type answer NOERROR with no records. A name listed in ``timeout`` gets
no answer at all (temperror paths), one in ``servfail`` a SERVFAIL. Records can be changed
while the server runs; answers too big for UDP are truncated (TC) and asked again over TCP.

The helpers (``spf``, ``mx``, ``a``, ``dkim``, ``dmarc``, ``mta_sts``, ``tlsa``, ``txt``)
write the records a mail domain publishes; ``queries`` lists every question asked.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import socket
import socketserver
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[str, dict[str, list[str]]]
"""``{owner name: {record type: [rdata text, ...]}}``."""

TXT_CHUNK = 255
"""The longest character-string of a TXT record (RFC 1035 3.3)."""


# ---------------------------------------------------------------------------- record text

def txt_rdata(text: str | bytes) -> str:
    """The zone-file rdata of a TXT record holding ``text``: quoted strings of at most 255
    bytes, with ``"`` and ``\\`` escaped and bytes outside printable ASCII as ``\\DDD``."""
    raw = text.encode() if isinstance(text, str) else text
    chunks = [raw[i:i + TXT_CHUNK] for i in range(0, len(raw), TXT_CHUNK)] or [b""]
    return " ".join('"' + "".join(_escape(b) for b in chunk) + '"' for chunk in chunks)


def _escape(byte: int) -> str:
    if byte in (0x22, 0x5C):  # " and \
        return "\\" + chr(byte)
    if 0x20 <= byte < 0x7F:
        return chr(byte)
    return f"\\{byte:03d}"


def txt_text(rdata: str) -> bytes:
    """The text of a TXT rdata (its strings joined), as a resolver sees it."""
    rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, rdata)
    return b"".join(rd.strings)  # type: ignore[attr-defined]


def mx_rdata(host: str, preference: int) -> str:
    """The rdata of one MX: ``host`` is a name (given ``preference``) or ``"PREF NAME"``."""
    parts = host.split()
    if len(parts) == 2 and parts[0].isdigit():
        preference, host = int(parts[0]), parts[1]
    elif len(parts) != 1:
        raise ValueError(f"not an MX host: {host!r} (a name, or 'PREFERENCE NAME')")
    if not 0 <= preference <= 65535:
        raise ValueError(f"MX preference {preference} is out of 0..65535")
    if host == ".":
        return f"{preference} ."
    try:
        name = dns.name.from_text(host.rstrip(".") + ".")
    except (dns.exception.DNSException, ValueError) as exc:
        raise ValueError(f"not an MX host name: {host!r} ({exc})") from None
    return f"{preference} {name.to_text()}"


def spf_text(policy: str) -> str:
    """``v=spf1`` followed by ``policy`` (kept as it is when it already starts so)."""
    policy = policy.strip()
    if policy.lower() == "v=spf1" or policy.lower().startswith("v=spf1 "):
        return policy
    return f"v=spf1 {policy}".rstrip()


def dmarc_text(policy: str = "reject", **tags: str | int) -> str:
    """A DMARC record: ``v=DMARC1; p=<policy>`` then ``tags`` in order (``rua="mailto:..."``,
    ``pct=50``, ``adkim="s"``...). A ``policy`` starting with ``v=DMARC1`` is kept whole."""
    if policy.startswith("v=DMARC1"):
        if tags:
            raise ValueError("give either a whole record or a policy and tags")
        return policy
    parts = ["v=DMARC1", f"p={policy}"] + [f"{k}={v}" for k, v in tags.items()]
    for part in parts:
        if ";" in part:
            raise ValueError(f"a DMARC tag value cannot contain ';': {part!r}")
    return "; ".join(parts)


def tlsa_rdata(cert: Any, usage: int = 3, selector: int = 1, mtype: int = 1) -> str:  # noqa: ANN401 - PEM bytes/str or a trustme cert or CA
    """The TLSA rdata of a certificate (RFC 6698): ``cert`` is PEM (bytes or str), a trustme
    ``LeafCert`` (its own certificate) or a trustme ``CA``. ``selector`` 0: the whole
    certificate, 1: its public key; ``mtype`` 0: exact, 1: SHA-256, 2: SHA-512."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pem = _pem_of(cert)
    parsed = x509.load_pem_x509_certificate(pem)
    data = parsed.public_bytes(Encoding.DER) if selector == 0 else \
        parsed.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    elif mtype != 0:
        raise ValueError(f"TLSA matching type {mtype} is not 0, 1 or 2")
    return f"{usage} {selector} {mtype} {data.hex()}"


def _pem_of(cert: Any) -> bytes:  # noqa: ANN401 - see tlsa_rdata
    if isinstance(cert, bytes):
        return cert
    if isinstance(cert, str):
        return cert.encode()
    if hasattr(cert, "cert_chain_pems"):  # trustme.LeafCert: the leaf is first
        return bytes(cert.cert_chain_pems[0].bytes())
    if hasattr(cert, "cert_pem"):  # trustme.CA
        return bytes(cert.cert_pem.bytes())
    raise TypeError(f"not a certificate: {type(cert).__name__}")


# ---------------------------------------------------------------------------- DKIM keys

@dataclass(frozen=True)
class DkimKeyPair:
    """A DKIM key made for a test: its record is in the DNS server that made it."""

    domain: str
    selector: str
    algorithm: Literal["rsa", "ed25519"]
    private_pem: bytes
    """PKCS#8 PEM: the file tampu's dkim plugin reads (``domains/<d>/dkim:<sel>.pem``)."""
    public: str
    """The base64 ``p=`` value."""
    signing_key: bytes
    """The private key as dkimpy's ``dkim.sign`` takes it (PKCS#1 PEM, or Ed25519 seed)."""

    @property
    def name(self) -> str:
        """The record's owner name: ``<selector>._domainkey.<domain>``."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt(self) -> str:
        """The record's text: ``v=DKIM1; k=rsa; p=...``."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public}"

    def sign(self, message: bytes, *, headers: tuple[str, ...] = ("from", "to", "subject",
                                                                 "date", "message-id")) -> bytes:
        """``message`` with a DKIM-Signature by this key on top (dkimpy, relaxed/simple)."""
        import dkim

        alg = b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"
        present = {line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
                   for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n") if b":" in line}
        signed = [h.encode() for h in headers if h in present] or [b"from"]
        field = dkim.sign(message, self.selector.encode(), self.domain.encode(),
                          self.signing_key, signature_algorithm=alg, include_headers=signed,
                          canonicalize=(b"relaxed", b"simple"))
        return bytes(field) + message

    def install(self, config_dir: Path) -> Path:
        """Write the private key where tampu's dkim plugin finds it; returns the path."""
        folder = Path(config_dir) / "domains" / self.domain
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"dkim:{self.selector}.pem"
        path.write_bytes(self.private_pem)
        path.chmod(0o600)
        return path


def make_dkim_key(domain: str, selector: str = "tampu", algorithm: Literal["rsa", "ed25519"]
                  = "rsa", bits: int = 2048) -> DkimKeyPair:
    """A fresh DKIM key pair for ``domain`` (not published anywhere)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    pkcs8 = serialization.PrivateFormat.PKCS8
    pem = serialization.Encoding.PEM
    none = serialization.NoEncryption()
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        return DkimKeyPair(domain, selector, "rsa", key.private_bytes(pem, pkcs8, none),
                           base64.b64encode(spki).decode(),
                           key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                             none))
    if algorithm == "ed25519":
        ed = ed25519.Ed25519PrivateKey.generate()
        raw = serialization.Encoding.Raw
        seed = ed.private_bytes(raw, serialization.PrivateFormat.Raw, none)
        public = ed.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
        return DkimKeyPair(domain, selector, "ed25519", ed.private_bytes(pem, pkcs8, none),
                           base64.b64encode(public).decode(), base64.b64encode(seed))
    raise ValueError(f"DKIM algorithm {algorithm!r} is not rsa or ed25519")


# ---------------------------------------------------------------------------- the server

def zone_of(name: str) -> str:
    """The zone the test servers take ``name`` to be in: its last two labels
    (``_dmarc.example.org`` -> ``example.org``), without the final dot."""
    return ".".join(name.rstrip(".").split(".")[-2:])


class DNSServer:
    def __init__(self, zone: Zone | None = None, host: str = "127.0.0.1",
                 timeout: set[str] | None = None, authenticated: bool = False,
                 ttl: int = 60, negative_ttl: int | None = None) -> None:
        self.zone: Zone = {}
        for name, records in (zone or {}).items():
            for rtype, values in records.items():
                self.set(name, rtype, values)
        self.timeout = {self._key(n) for n in (timeout or set())}
        self.authenticated = authenticated
        """Set the AD bit on answers, as a validating resolver does for signed zones."""
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        """None: NXDOMAIN and NODATA answers carry no SOA, so resolvers do not cache them
        (RFC 2308 5). A number: they carry the SOA of the name's zone (:func:`zone_of`) with
        that TTL and MINIMUM, as a real authoritative server's do (RFC 2308 3)."""
        self.servfail: set[str] = set()
        self.host = host
        self.queries: list[tuple[str, str]] = []
        self._udp: socketserver.UDPServer | None = None
        self._tcp: socketserver.TCPServer | None = None

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".") + "."

    # ------------------------------------------------------------------ records

    def set(self, name: str, rtype: str, values: list[str]) -> None:
        """Replace the ``rtype`` records of ``name`` (rdata text; [] leaves the name known)."""
        self.zone.setdefault(self._key(name), {})[rtype.upper()] = list(values)

    def add(self, name: str, rtype: str, *values: str) -> None:
        """Add records to those ``name`` has of ``rtype``."""
        records = self.zone.setdefault(self._key(name), {})
        records[rtype.upper()] = records.get(rtype.upper(), []) + list(values)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Forget ``name`` (then NXDOMAIN), or only its ``rtype`` records."""
        if rtype is None:
            self.zone.pop(self._key(name), None)
        else:
            self.zone.get(self._key(name), {}).pop(rtype.upper(), None)

    def records(self, name: str, rtype: str) -> list[str]:
        return list(self.zone.get(self._key(name), {}).get(rtype.upper(), []))

    def txt(self, name: str, *texts: str, replace: bool = True) -> None:
        """TXT records of plain ``texts`` (quoted and split as needed)."""
        values = [txt_rdata(t) for t in texts]
        if replace:
            self.set(name, "TXT", values)
        else:
            self.add(name, "TXT", *values)

    def _replace_txt(self, name: str, prefix: str, text: str) -> None:
        """Set the TXT record starting with ``prefix``, keeping the name's other TXTs."""
        kept = [v for v in self.records(name, "TXT")
                if not txt_text(v).lower().startswith(prefix.lower().encode())]
        self.set(name, "TXT", [*kept, txt_rdata(text)])

    def spf(self, domain: str, policy: str = "-all") -> str:
        """Publish the SPF record of ``domain`` (``"ip4:127.0.0.1 -all"`` or a whole
        ``v=spf1 ...``); other TXT records of the name stay. Returns the record text."""
        text = spf_text(policy)
        self._replace_txt(domain, "v=spf1", text)
        return text

    def a(self, name: str, *addresses: str) -> None:
        """The A and AAAA records of ``name`` (each address goes where its family says)."""
        v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        v6 = [str(ipaddress.ip_address(a)) for a in addresses
              if ipaddress.ip_address(a).version == 6]
        self.set(name, "A", v4)
        self.set(name, "AAAA", v6)

    def mx(self, domain: str, *hosts: str, addresses: Mapping[str, str | list[str]]
           | None = None) -> list[str]:
        """The MX records of ``domain``: names get preferences 10, 20, ... in order
        (``"5 mx.example.test"`` keeps its own; ``"."`` alone is a null MX, RFC 7505);
        ``addresses`` also publishes each host's A/AAAA. Returns the rdata."""
        values = [mx_rdata(h, 10 * (i + 1)) for i, h in enumerate(hosts)]
        self.set(domain, "MX", values)
        for host, found in (addresses or {}).items():
            self.a(host, *([found] if isinstance(found, str) else found))
        return values

    def dkim(self, domain: str, selector: str = "tampu", *,
             algorithm: Literal["rsa", "ed25519"] = "rsa", bits: int = 2048,
             key: DkimKeyPair | None = None) -> DkimKeyPair:
        """Make a DKIM key pair (or take ``key``) and publish its record at
        ``<selector>._domainkey.<domain>``; returns the key (``.sign(message)``,
        ``.install(config_dir)``)."""
        key = key or make_dkim_key(domain, selector, algorithm, bits)
        self.txt(key.name, key.txt)
        return key

    def dmarc(self, domain: str, policy: str = "reject", **tags: str | int) -> str:
        """Publish ``_dmarc.<domain>``: ``dmarc("example.org", "quarantine", pct=50,
        rua="mailto:d@example.org")``. Returns the record text."""
        text = dmarc_text(policy, **tags)
        self._replace_txt(f"_dmarc.{domain}", "v=DMARC1", text)
        return text

    def mta_sts(self, domain: str, policy_id: str = "20240101") -> str:
        """Publish the ``_mta-sts.<domain>`` TXT record (RFC 8461 3.1) with ``id``; the
        policy itself is served over HTTPS by the test (``https://mta-sts.<domain>``)."""
        text = f"v=STSv1; id={policy_id}"
        self._replace_txt(f"_mta-sts.{domain}", "v=STSv1", text)
        return text

    def tlsa(self, host: str, cert: Any, *, port: int = 25, usage: int = 3,  # noqa: ANN401 - see tlsa_rdata
             selector: int = 1, mtype: int = 1, add: bool = False) -> str:
        """Publish a TLSA record of ``cert`` at ``_<port>._tcp.<host>`` (DANE-EE SPKI SHA-256
        by default); ``add`` keeps the records already there. Set ``authenticated = True``
        for DANE to trust them."""
        rdata = tlsa_rdata(cert, usage, selector, mtype)
        name = f"_{port}._tcp.{host}"
        if add:
            self.add(name, "TLSA", rdata)
        else:
            self.set(name, "TLSA", [rdata])
        return rdata

    # ------------------------------------------------------------------ answering

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
        if not resp.answer and self.negative_ttl is not None:
            apex = zone_of(q.name.to_text()) + "."
            resp.authority.append(dns.rrset.from_text(
                apex, self.negative_ttl, "IN", "SOA",
                f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {self.negative_ttl}"))
        out = resp.to_wire()
        if udp and len(out) > 512:  # too big for plain UDP: truncated, ask again over TCP
            resp.answer.clear()
            resp.flags |= dns.flags.TC
            out = resp.to_wire()
        return out

    def __enter__(self) -> DNSServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._udp is not None
        return int(self._udp.server_address[1])

    @property
    def address(self) -> str:
        """``host:port`` (``[::1]:port`` for IPv6), as ``[server] dns_servers`` takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def conf_line(self) -> str:
        """``dns_servers = ["127.0.0.1:<port>"]``, for a ``[server]`` table."""
        return f'dns_servers = ["{self.address}"]'

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
