"""DNS messages on the wire (RFC 1035 4.1) for the resolver (:mod:`tampu.dns`): the query,
and a TXT answer read without dnspython.

SPF, DKIM and DMARC ask for TXT records, on every message whose answers are not cached:
building and parsing those messages with dnspython costs about a quarter of a millisecond
each, several times what this code needs. Anything this code does not handle plainly (other
record types, EDNS, a label that is not plain text, a damaged message) is left to
dnspython (:func:`decode`): both give the same :class:`Response`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.name
import dns.rdatatype
from dns.flags import AD, RD
from dns.rdataclass import IN as CLASS_IN
from dns.rdatatype import CNAME, SOA, TXT

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_SOA_TAIL = struct.Struct("!IIIII")
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")


class NotSimple(Exception):
    """This message is left to dnspython."""


@dataclass(frozen=True, slots=True)
class TxtRecord:
    """One TXT record: its character-strings (as dnspython's ``TXT.strings``)."""

    strings: tuple[bytes, ...]


@dataclass
class Response:
    """A DNS response, as much of it as the resolver reads."""

    id: int
    flags: int
    rcode: int
    question: tuple[str, int] | None
    """(name in lower case, without the final dot; type) of the first question."""
    answer: list[tuple[str, int, int, int, Any]] = field(default_factory=list)
    """(owner, type, class, TTL, record) per record of the answer section, duplicates of a
    record set left out; a CNAME's record is its target's name (lower case), a TXT record a
    :class:`TxtRecord`, others dnspython's rdata."""
    soa: tuple[int, int] | None = None
    """(TTL, MINIMUM) of the authority section's SOA: the negative-caching TTL (RFC 2308)."""


def make_query(name: str, rdtype: int, qid: int) -> bytes:
    """A query for ``name`` (ASCII, no final dot) with RD and AD set (as the resolver has
    always asked: RFC 6840 5.7), no EDNS."""
    if not _plain(name):
        query = dns.message.make_query(name, dns.rdatatype.RdataType(rdtype))
        query.flags |= AD
        query.id = qid
        return query.to_wire()
    out = [_HEADER.pack(qid, RD | AD, 1, 0, 0, 0)]
    for label in name.split("."):
        out.append(bytes((len(label),)) + label.encode())
    out.append(b"\0" + struct.pack("!HH", rdtype, CLASS_IN))
    return b"".join(out)


def _plain(name: str) -> bool:
    """An ASCII name of letters, digits, ``-``, ``_`` and ``*`` in well-formed labels: sent
    and spelled as it is (anything else goes through dnspython)."""
    return bool(name) and len(name) <= 253 and name.isascii() and all(
        0 < len(label) <= 63 and _PLAIN.issuperset(label.encode())
        for label in name.split("."))


def text_form(name: str) -> str:
    """``name`` as a :class:`Response` spells names (lower case, dnspython's escapes)."""
    return name.lower() if _plain(name) else _text(dns.name.from_text(name))


def decode(wire: bytes, rdtype: int) -> Response:
    """The response ``wire`` to a question for ``rdtype``. Raises dnspython's exceptions
    for what it cannot read either."""
    if rdtype == TXT:
        try:
            return parse_txt(wire)
        except NotSimple:
            pass
    return from_message(dns.message.from_wire(wire, ignore_trailing=True))


def from_message(msg: dns.message.Message) -> Response:
    """A dnspython message as a :class:`Response`."""
    question = None
    if msg.question:
        question = (_text(msg.question[0].name), int(msg.question[0].rdtype))
    out = Response(msg.id, int(msg.flags), int(msg.rcode()), question)
    for rrset in msg.answer:
        owner = _text(rrset.name)
        for rd in rrset:
            record = _text(rd.target) if rrset.rdtype == CNAME else \
                TxtRecord(tuple(rd.strings)) if rrset.rdtype == TXT else rd
            out.answer.append((owner, int(rrset.rdtype), int(rrset.rdclass), rrset.ttl,
                               record))
    for rrset in msg.authority:
        if rrset.rdtype == SOA and len(rrset):
            out.soa = (rrset.ttl, rrset[0].minimum)
            break
    return out


def _text(name: Any) -> str:  # noqa: ANN401 - a dns.name.Name
    """As :func:`_name` spells it: the root is ``""`` (dnspython's short form says ``.``)."""
    text = str(name.to_text()).lower()
    return text[:-1] if text.endswith(".") else text


def parse_txt(wire: bytes) -> Response:
    """A response whose answer section holds only TXT and CNAME records. Raises
    NotSimple for anything else, or for a message that is not whole and well formed."""
    if len(wire) < _HEADER.size:
        raise NotSimple("short")
    qid, flags, qdcount, ancount, nscount, _arcount = _HEADER.unpack_from(wire)
    if qdcount > 1 or flags & 0x7800:  # an opcode other than QUERY
        raise NotSimple("unusual header")
    pos = _HEADER.size
    question = None
    if qdcount:
        qname, pos = _name(wire, pos)
        if pos + 4 > len(wire):
            raise NotSimple("short question")
        qtype, _qclass = struct.unpack_from("!HH", wire, pos)
        pos += 4
        question = (qname, qtype)
    out = Response(qid, flags, flags & 0x000F, question)
    sets: dict[tuple[str, int, int], tuple[int, dict[Any, None]]] = {}
    """Record sets as dnspython makes them: in order of first appearance, each record once,
    the smallest TTL of its records."""
    for _ in range(ancount):
        owner, rtype, rclass, ttl, start, end = _rr(wire, pos)
        if rtype == TXT:
            record: Any = TxtRecord(_strings(wire, start, end))
        elif rtype == CNAME:
            record, stop = _name(wire, start)
            if stop != end:
                raise NotSimple("CNAME length")
        else:
            raise NotSimple(f"type {rtype} in the answer")
        key = (owner, rtype, rclass)
        least, records = sets.get(key, (ttl, {}))
        if rtype == CNAME:  # a singleton type: the last one counts, as in dnspython
            records.clear()
        records[record] = None
        sets[key] = (min(least, ttl), records)
        pos = end
    out.answer = [(*key, ttl, record) for key, (ttl, records) in sets.items()
                  for record in records]
    for _ in range(nscount):
        _owner, rtype, _rclass, ttl, start, end = _rr(wire, pos)
        if rtype == SOA and out.soa is None:
            _mname, at = _name(wire, start)
            _rname, at = _name(wire, at)
            if at + _SOA_TAIL.size != end:
                raise NotSimple("SOA length")
            out.soa = (ttl, _SOA_TAIL.unpack_from(wire, at)[4])
        pos = end
    # the additional section is not read (no EDNS was asked for)
    return out


def _rr(wire: bytes, pos: int) -> tuple[str, int, int, int, int, int]:
    """One resource record: (owner, type, class, TTL, start and end of its data)."""
    owner, pos = _name(wire, pos)
    if pos + _RR.size > len(wire):
        raise NotSimple("short record")
    rtype, rclass, ttl, length = _RR.unpack_from(wire, pos)
    start = pos + _RR.size
    end = start + length
    if end > len(wire):
        raise NotSimple("short record data")
    if ttl > 0x7FFFFFFF:
        ttl = 0  # RFC 2181 8: the top bit set counts as zero (so does dnspython)
    return owner, rtype, rclass, ttl, start, end


def _strings(wire: bytes, start: int, end: int) -> tuple[bytes, ...]:
    if start == end:
        raise NotSimple("empty TXT")
    out = []
    while start < end:
        n = wire[start]
        if start + 1 + n > end:
            raise NotSimple("TXT string length")
        out.append(wire[start + 1:start + 1 + n])
        start += 1 + n
    return tuple(out)


def _name(wire: bytes, pos: int) -> tuple[str, int]:
    """A domain name at ``pos`` (compression pointers followed, backwards only): its text
    in lower case without the final dot, and the position after it."""
    labels: list[bytes] = []
    after = -1
    size = 0
    while True:
        if pos >= len(wire):
            raise NotSimple("name past the end")
        n = wire[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(wire):
                raise NotSimple("short pointer")
            target = (n & 0x3F) << 8 | wire[pos + 1]
            if target >= pos:
                raise NotSimple("pointer forward")
            if after < 0:
                after = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise NotSimple("label type")
        label = wire[pos + 1:pos + 1 + n]
        if len(label) < n or not _PLAIN.issuperset(label):
            raise NotSimple("label")
        size += n + 1
        if size > 254:
            raise NotSimple("name too long")
        labels.append(label)
        pos += 1 + n
    return b".".join(labels).decode("ascii").lower(), after if after >= 0 else pos
