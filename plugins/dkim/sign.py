"""DKIM signing (RFC 6376, RFC 8463) with dkimpy: one DKIM-Signature per key.

The signing domain is the domain of the author (the RFC5322.From address), so that the
signature is aligned for DMARC. The header fields signed are those of ``headers`` that the
message has, each as many times as it occurs, plus ``From`` once more so that no second From
can be added without breaking the signature (RFC 6376 8.15, "oversigning").
Canonicalization is relaxed/relaxed; ``t=`` is the signing time.
"""

from __future__ import annotations

import email.utils
import logging
from collections.abc import Iterable, Sequence
from typing import Final

import dkim

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

_DKIMPY_LOG = logging.getLogger("tampu.plugins.dkim.dkimpy")


class SigningError(Exception):
    """The message could not be signed (dkimpy refused it: a malformed header section)."""


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
         ) -> list[tuple[str, str]]:
    """One ``("DKIM-Signature", value)`` per key, the value folded with CRLF + space.

    Raises SigningError when dkimpy cannot parse or sign the message.
    """
    include = headers_to_sign(message, headers)
    if b"from" not in include:
        raise SigningError("the message has no From header field")
    try:
        signer = dkim.DKIM(message, logger=_DKIMPY_LOG, linesep=b"\r\n")
    except dkim.DKIMException as exc:
        raise SigningError(f"cannot parse the message: {exc}") from None
    out: list[tuple[str, str]] = []
    for key in keys:
        try:
            field = signer.sign(key.selector.encode("ascii"), key.ascii_domain.encode("ascii"),
                                key.private, signature_algorithm=key.algorithm.encode("ascii"),
                                canonicalize=(b"relaxed", b"relaxed"),
                                include_headers=include)
        except dkim.DKIMException as exc:
            raise SigningError(f"dkimpy refused to sign with {key.path}: {exc}") from None
        name, _, value = field.partition(b":")
        out.append((name.decode("ascii"), value.strip(b" \r\n").decode("ascii")))
    return out
