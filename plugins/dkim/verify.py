"""DKIM verification (RFC 6376, RFC 8301, RFC 8463) without blocking on DNS.

:meth:`Verifier.verify` works in three steps:

1. the DKIM-Signature fields are parsed from the header section (dkimpy's own parser, so the
   fields are numbered as dkimpy numbers them) and checked for what makes a signature
   unusable before any lookup: missing or malformed tags, ``rsa-sha1`` (RFC 8301), an ``h=``
   without From;
2. the key records ``<s>._domainkey.<d>`` of the usable ones are fetched concurrently through
   tampu's asynchronous DNS client (which caches them for their TTL);
3. dkimpy verifies each signature with a ``dnsfunc`` that answers from those records: on the
   event loop for a message up to :data:`INLINE_CHECK_BYTES`, in a worker thread for a
   bigger one (canonicalizing and hashing the body is the costly part); the RSA step itself
   is OpenSSL's (:mod:`.rsa_verify`).

The whole verification is bounded by ``timeout``; what did not finish is ``temperror``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from typing import Final, Literal

import dkim
import dkim.util

from tampu.authres import MethodResult
from tampu.dns import Answer, DnsTempError, Resolver, to_ascii
from tampu.envelope import iter_headers
from tampu.plugins.dkim import rsa_verify

log = logging.getLogger("tampu.plugins.dkim")

Result = Literal["pass", "fail", "neutral", "none", "temperror", "permerror"]
MIN_RSA_BITS_VERIFY: Final = 1024
"""RFC 8301 3.2: keys smaller than 1024 bits MUST NOT be considered valid."""

INLINE_CHECK_BYTES: Final = 32 * 1024
"""Messages up to this size are checked on the event loop (about 0.35 ms of CPU for 2 kB,
0.8 ms for 20 kB); under load a worker thread would cost more than that in waiting for the
GIL. Bigger ones are checked in a worker thread (3.4 ms for 200 kB)."""
_DKIMPY_LOG = logging.getLogger("tampu.plugins.dkim.dkimpy")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_WSP = re.compile(rb"\s+")
_REQUIRED: Final = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
"""RFC 6376 3.5: the tags a DKIM-Signature must have."""


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """The outcome of one DKIM-Signature."""

    result: Result
    domain: str = ""
    """``d=`` as written (empty when the field could not be read)."""
    selector: str = ""
    b: str = ""
    """The first 8 characters of ``b=`` (RFC 6008 ``header.b``)."""
    reason: str = ""
    algorithm: str = ""

    def method_result(self) -> MethodResult:
        """For :func:`tampu.authres.add_result`."""
        props = tuple((k, v) for k, v in (("header.d", self.domain), ("header.s", self.selector),
                                          ("header.b", self.b)) if v)
        return MethodResult("dkim", self.result, props, reason=self.reason)

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.result} d={self.domain or '?'} s={self.selector or '?'}{why}"


@dataclass
class _Signature:
    index: int
    tags: dict[bytes, bytes]
    domain: str
    selector: str
    b: str
    algorithm: str
    result: SignatureResult | None = None
    """Decided before verification (permerror, temperror); None: to be verified."""
    qname: str = ""
    record: bytes | None = field(default=None, repr=False)


def _text(value: bytes, limit: int = 200) -> str:
    return _UNPRINTABLE.sub("?", value.decode("utf-8", "replace"))[:limit]


def _lenient_tags(value: bytes) -> dict[bytes, bytes]:
    """Tags of a field dkimpy cannot parse, for the result's properties only."""
    tags: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        name, sep, val = part.partition(b"=")
        if sep:
            tags.setdefault(_WSP.sub(b"", name), _WSP.sub(b"", val))
    return tags


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # dkimpy quotes whole tag values in its messages; keep the reason short
    return _UNPRINTABLE.sub("?", text)[:120]


class Verifier:
    """Verifies the DKIM signatures of a message, key records fetched through ``resolver``."""

    def __init__(self, resolver: Resolver, *, timeout: float = 10.0,
                 max_signatures: int = 10, min_rsa_bits: int = MIN_RSA_BITS_VERIFY) -> None:
        self.resolver = resolver
        self.timeout = timeout
        self.max_signatures = max_signatures
        self.min_rsa_bits = min_rsa_bits
        rsa_verify.install()  # RSA signatures checked by OpenSSL, not dkimpy's Python

    async def verify(self, message: bytes) -> list[SignatureResult]:
        """One result per DKIM-Signature field (at most ``max_signatures``, then one
        ``neutral`` for the rest); an empty list when the message has none."""
        sigs, skipped = self.parse(message)
        if not sigs:
            return []
        try:
            async with asyncio.timeout(self.timeout):
                await self._fetch(sigs)
                pending = [s for s in sigs if s.result is None]
                if pending:
                    if len(message) <= INLINE_CHECK_BYTES:
                        done = self.check(message, pending)
                    else:
                        done = await asyncio.to_thread(self.check, message, pending)
                    for sig, res in zip(pending, done, strict=True):
                        sig.result = res
        except TimeoutError:
            log.info("DKIM verification stopped after %.1f s", self.timeout)
        out = [s.result or SignatureResult("temperror", s.domain, s.selector, s.b,
                                           "verification took too long", s.algorithm)
               for s in sigs]
        if skipped:
            out.append(SignatureResult("neutral", reason=f"{skipped} more signatures not "
                                       f"checked (max_signatures={self.max_signatures})"))
        return out

    # ------------------------------------------------------------------ step 1

    def parse(self, message: bytes) -> tuple[list[_Signature], int]:
        """The DKIM-Signature fields (up to the limit) and how many more there are."""
        head = header_block(message)
        if b"dkim-signature" not in head.lower():
            return [], 0
        try:
            headers, _ = dkim.rfc822_parse(head + b"\r\n\r\n")
            fields = [v for n, v in headers if n.lower() == b"dkim-signature"]
            broken = ""
        except dkim.DKIMException as exc:  # a header line dkimpy cannot read
            fields = [v.encode("utf-8", "surrogateescape") for n, v in iter_headers(head)
                      if n.lower() == "dkim-signature"]
            broken = f"malformed header section: {_describe(exc)}"
        checked = fields[:self.max_signatures]
        sigs = [self._parse_one(i, value, broken) for i, value in enumerate(checked)]
        return sigs, len(fields) - len(checked)

    def _parse_one(self, index: int, value: bytes, broken: str) -> _Signature:
        try:
            tags: dict[bytes, bytes] = dkim.util.parse_tag_value(value)
            error = broken
        except dkim.util.InvalidTagValueList as exc:
            tags, error = _lenient_tags(value), f"malformed tag list: {_describe(exc)}"
        domain = _text(tags.get(b"d", b""))
        selector = _text(tags.get(b"s", b""))
        b = _text(_WSP.sub(b"", tags.get(b"b", b"")), 8)
        algorithm = _text(tags.get(b"a", b""), 40)
        sig = _Signature(index, tags, domain, selector, b, algorithm)

        def perm(reason: str) -> _Signature:
            sig.result = SignatureResult("permerror", domain, selector, b, reason, algorithm)
            return sig

        if error:
            return perm(error)
        missing = [t.decode() for t in _REQUIRED if t not in tags]
        if missing:
            return perm(f"missing {'= '.join(missing)}=")
        try:
            dkim.validate_signature_fields(tags)
        except dkim.DKIMException as exc:
            return perm(_describe(exc))
        if algorithm not in ("rsa-sha256", "ed25519-sha256"):
            return perm(f"unsupported algorithm {algorithm} (RFC 8301: rsa-sha1 is not "
                        "accepted)" if algorithm == "rsa-sha1" else
                        f"unsupported algorithm {algorithm}")
        signed = [h.strip().lower() for h in tags[b"h"].split(b":")]
        if b"from" not in signed:
            return perm("From is not signed")
        try:
            sig.qname = to_ascii(f"{selector}._domainkey.{domain}")
        except ValueError:
            return perm("d= or s= is not a valid domain name")
        return sig

    # ------------------------------------------------------------------ step 2

    async def _fetch(self, sigs: list[_Signature]) -> None:
        names = sorted({s.qname for s in sigs if s.result is None})
        if not names:
            return
        answers = await asyncio.gather(*(self.resolver.query(n, "TXT") for n in names),
                                       return_exceptions=True)
        got: dict[str, Answer | BaseException] = dict(zip(names, answers, strict=True))
        for sig in sigs:
            if sig.result is None:
                self._choose_record(sig, got[sig.qname])

    def _choose_record(self, sig: _Signature, answer: Answer | BaseException) -> None:
        def decide(result: Result, reason: str) -> None:
            sig.result = SignatureResult(result, sig.domain, sig.selector, sig.b, reason,
                                         sig.algorithm)

        if isinstance(answer, DnsTempError):
            return decide("temperror", f"key lookup failed: {_describe(answer)}")
        if isinstance(answer, ValueError):
            return decide("permerror", "d= or s= is not a valid domain name")
        if isinstance(answer, BaseException):
            return decide("temperror", f"key lookup failed: {type(answer).__name__}")
        records = [b"".join(r.strings) for r in answer.records if hasattr(r, "strings")]
        if not records:  # RFC 6376 6.1.2 step 3
            return decide("permerror", "no key for signature")
        problem = ""
        for record in records:
            problem = self._key_problem(sig, record)
            if not problem:
                sig.record = record
                return None
        return decide("permerror", problem)

    def _key_problem(self, sig: _Signature, record: bytes) -> str:
        """Why ``record`` cannot verify ``sig`` (RFC 6376 3.6.1, 6.1.2), or ""."""
        try:
            tags = dkim.util.parse_tag_value(record)
        except dkim.util.InvalidTagValueList:
            return "key record syntax error"
        if tags.get(b"v", b"DKIM1") != b"DKIM1":
            return "key record: bad version"
        if b"p" not in tags:
            return "key record has no p="
        if not tags[b"p"]:
            return "key revoked"
        ktype = tags.get(b"k", b"rsa")
        if ktype not in (b"rsa", b"ed25519"):
            return f"unsupported key type {_text(ktype, 20)}"
        if not sig.algorithm.encode().startswith(ktype + b"-"):
            return f"key type {_text(ktype, 20)} does not match a={sig.algorithm}"
        hashes = tags.get(b"h")
        if hashes is not None and b"sha256" not in [h.strip() for h in hashes.split(b":")]:
            return "key record does not allow sha256"
        services = tags.get(b"s")
        if services is not None and not {b"*", b"email"} & {
                s.strip() for s in services.split(b":")}:
            return "key is not for email"
        try:
            dkim.evaluate_pk(sig.qname.encode(), record)
        except dkim.DKIMException as exc:
            return f"unusable key: {_describe(exc)}"
        except Exception as exc:  # dkimpy's ASN.1 and base64 errors are not all wrapped
            return f"unusable key: {type(exc).__name__}"
        return ""

    # ------------------------------------------------------------------ step 3

    def check(self, message: bytes, sigs: list[_Signature]) -> list[SignatureResult]:
        """Verify ``sigs`` (their records fetched): CPU only, for a worker thread."""
        try:
            verifier = dkim.DKIM(message, logger=_DKIMPY_LOG, minkey=self.min_rsa_bits)
        except dkim.DKIMException as exc:
            return [SignatureResult("permerror", s.domain, s.selector, s.b,
                                    f"malformed message: {_describe(exc)}", s.algorithm)
                    for s in sigs]
        return [self._check_one(verifier, s) for s in sigs]

    def _check_one(self, verifier: dkim.DKIM, sig: _Signature) -> SignatureResult:
        record = sig.record

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            return record

        def result(res: Result, reason: str = "") -> SignatureResult:
            return SignatureResult(res, sig.domain, sig.selector, sig.b, reason, sig.algorithm)

        try:
            ok = verifier.verify(idx=sig.index, dnsfunc=dnsfunc)
        except dkim.ValidationError as exc:
            if str(exc).startswith("body hash mismatch"):
                return result("fail", "body hash did not verify")
            return result("permerror", _describe(exc))
        except dkim.KeyFormatError as exc:
            if "too small" in str(exc):
                return result("permerror", f"key too small ({verifier.keysize} bits)")
            return result("permerror", f"unusable key: {_describe(exc)}")
        except dkim.DKIMException as exc:
            return result("permerror", _describe(exc))
        except Exception as exc:  # dkimpy bugs on hostile input must not fail the intake
            log.warning("dkimpy raised %s verifying d=%s s=%s: %s", type(exc).__name__,
                        sig.domain, sig.selector, exc)
            return result("permerror", f"verification error: {type(exc).__name__}")
        if ok:
            return result("pass")
        return result("fail", "signature did not verify")


_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


def header_block(message: bytes) -> bytes:
    """The header section as dkimpy delimits it: up to the first empty line (CRLF or LF)."""
    if message.startswith((b"\r\n", b"\n")):
        return b""
    end = _END_OF_HEADERS.search(message)
    return message[:end.start()] if end else message
