"""DKIM signing (RFC 6376, RFC 8463): one DKIM-Signature per key.

The signing domain is the domain of the author (the RFC5322.From address), so that the
signature is aligned for DMARC. The header fields signed are those of ``headers`` that the
message has, each as many times as it occurs, plus ``From`` once more so that no second From
can be added without breaking the signature (RFC 6376 8.15, "oversigning").
Canonicalization is relaxed/relaxed; ``t=`` is the signing time.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Final

import dkim
from dkim.canonicalization import CanonicalizationPolicy

from tampu import Message
from tampu.addresses import AddressError, normalize_domain
from tampu.envelope import header_section
from tampu.plugins.dkim.keys import DkimKey

log = logging.getLogger("tampu.plugins.dkim")

DEFAULT_HEADERS: Final = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version",
                          "Content-Type", "Content-Transfer-Encoding", "Reply-To",
                          "In-Reply-To", "References")
NEVER_SIGNED: Final = frozenset(h.decode() for h in dkim.DKIM.SHOULD_NOT)
"""RFC 6376 5.4.1: header fields a signer should not sign (Received, Return-Path, Bcc, ...);
dkimpy refuses them."""

_RELAXED: Final = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


class SigningError(Exception):
    """The message could not be signed (a malformed header section, no From, no key)."""


def author_domain(message: bytes) -> str | None:
    """The canonical domain of the message's author (RFC5322.From), or None.

    None when there is not exactly one From header field, or its addresses are not all in
    one valid domain.
    """
    values = Message(message).header_values("From")
    if len(values) != 1:
        return None
    domains: set[str] = set()
    for _name, address in email.utils.getaddresses(values):
        _, at, domain = address.rpartition("@")
        if not at or not domain:
            return None
        try:
            domains.add(normalize_domain(domain))
        except AddressError:
            return None
    return domains.pop() if len(domains) == 1 else None


def headers_to_sign(message: bytes, names: Iterable[str]) -> list[bytes]:
    """dkimpy's ``include_headers``: each wanted field present, once per occurrence, in
    message order, then ``from`` once more (oversigned)."""
    wanted = {n.lower() for n in names}
    out: list[bytes] = []
    for line in header_section(message).split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            continue
        name, sep, _ = line.partition(b":")
        lname = name.strip().lower()
        if sep and lname.decode("ascii", "replace") in wanted:
            out.append(lname)
    if b"from" in out:
        out.append(b"from")
    return out


def sign(message: bytes, keys: Sequence[DkimKey], headers: Sequence[str] = DEFAULT_HEADERS,
         now: float | None = None) -> list[tuple[str, str]]:
    """One ``("DKIM-Signature", value)`` per key, the value folded with CRLF + space.

    dkimpy parses and canonicalizes (relaxed/relaxed); the signature itself is OpenSSL's
    (``cryptography``): dkimpy's RSA is pure Python, ten times slower. Raises SigningError
    when the message cannot be parsed or has no From.
    """
    include = headers_to_sign(message, headers)
    if b"from" not in include:
        raise SigningError("the message has no From header field")
    try:
        fields, body = dkim.rfc822_parse(message)
    except dkim.DKIMException as exc:
        raise SigningError(f"cannot parse the message: {exc}") from None
    body_hash = base64.b64encode(hashlib.sha256(_RELAXED.canonicalize_body(body)).digest())
    chosen = dkim.select_headers(_RELAXED.canonicalize_headers(fields), include)
    hashed = b"".join(name + b":" + value for name, value in chosen)
    stamp = str(int(time.time() if now is None else now)).encode("ascii")
    out: list[tuple[str, str]] = []
    for key in keys:
        tags = [b"v=1", b"a=" + key.algorithm.encode("ascii"), b"c=relaxed/relaxed",
                b"d=" + key.ascii_domain.encode("ascii"), b"s=" + key.selector.encode("ascii"),
                b"t=" + stamp, b"h=" + b":".join(include), b"bh=" + body_hash]
        unsigned = b"; ".join(tags) + b"; b="
        # the field as hashed (RFC 6376 3.7): canonicalized, with b= empty, no final CRLF
        ((name, value),) = _RELAXED.canonicalize_headers([[b"DKIM-Signature",
                                                            b" " + unsigned]])
        signature = _signature(key, hashed + name + b":" + value.rstrip(b"\r\n"))
        out.append(("DKIM-Signature", _fold(tags, base64.b64encode(signature))))
    return out


def _signature(key: DkimKey, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    if isinstance(key.signer, rsa.RSAPrivateKey):
        return key.signer.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key.signer, ed25519.Ed25519PrivateKey):  # RFC 8463 3: of the SHA-256 hash
        return key.signer.sign(hashlib.sha256(data).digest())
    raise SigningError(f"no usable private key in {key.path}")


def _fold(tags: list[bytes], signature: bytes) -> str:
    """``tag; tag; ...; b=...`` in lines of about 76 characters: breaks between tags and
    inside the base64 of b= (folding whitespace is allowed there, RFC 6376 3.5)."""
    lines, line = [], ""
    for tag in (t.decode("ascii") + ";" for t in tags):
        if line and len(line) + 1 + len(tag) > 76:
            lines.append(line)
            line = tag
        else:
            line = f"{line} {tag}" if line else tag
    lines.append(line)
    b64 = signature.decode("ascii")
    chunks = [b64[i:i + 72] for i in range(0, len(b64), 72)]
    return "\r\n ".join([*lines, "b=" + chunks[0], *chunks[1:]])
