"""The queue log's files: segment names, the record format, writing and reading records.

Segment files: ``<queue>/log/<boot>-<pid>-<start>-<seq>.seg``: the boot they were written in
(``/proc/sys/kernel/random/boot_id``), the writing process (its PID and start time: a live
process is never mistaken for a dead one) and a sequence number. Content: :data:`MAGIC`, one
JSON line (the owner), then records ``kind | flags | id length | payload length | crc32``
(``<cBHII``), the ID and the payload, then (a spare's) zeros, which end the records:

* ``P`` an item was put: the payload is its whole item file (header line and message);
* ``D`` an item left the queue and every delivery made for it was durable before;
* ``L`` an item left the queue after deliveries written without fsync (durable at the
  segment's retirement: they count only while the machine has not restarted);
* ``F`` an item's file was written before its state (from then on, in this boot, the file
  is the item: another process may deliver it and remove it).

Records end at the first incomplete or damaged one, or where a spare's zeros begin
(:mod:`tampu.queue_log` writes segments; :mod:`tampu.queue_recovery` reads the dead ones).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tampu.files import process_start

SUFFIX: Final = ".seg"
SPARE_PREFIX: Final = ".spare-"
ROOTS_FILE: Final = "roots"
"""Other filesystems where deliveries are written without fsync, one path per line."""
MAGIC: Final = b"tampu queue log 1\n"
_REC: Final = struct.Struct("<cBHII")
PUT: Final = b"P"
DONE: Final = b"D"
LEFT: Final = b"L"
FILED: Final = b"F"
IOV_MAX: Final = 512


def write_all(fd: int, chunks: list[bytes], offset: int = 0) -> int:
    """Write every chunk at ``offset`` (``pwritev``, short writes continued); the bytes
    written."""
    total = 0
    pending = [memoryview(c) for c in chunks if c]
    while pending:
        n = os.pwritev(fd, pending[:IOV_MAX], offset + total)
        total += n
        while n and pending:
            if n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][n:]
                n = 0
    return total


def record(kind: bytes, item_id: str, payload: list[bytes]) -> list[bytes]:
    """The chunks of one record (header, ID, payload)."""
    ident = item_id.encode()
    size = sum(len(p) for p in payload)
    crc = zlib.crc32(kind + ident)
    for part in payload:
        crc = zlib.crc32(part, crc)
    return [_REC.pack(kind, 0, len(ident), size, crc), ident, *payload]


@dataclass(frozen=True)
class SegmentName:
    """What a segment's file name says."""

    boot: str
    pid: int
    start: int
    seq: int

    @property
    def owner(self) -> str:
        return f"{self.boot}-{self.pid}-{self.start}"

    @classmethod
    def parse(cls, name: str) -> SegmentName | None:
        if not name.endswith(SUFFIX):
            return None
        parts = name[: -len(SUFFIX)].split("-")
        if len(parts) != 4:
            return None
        try:
            return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]))
        except ValueError:
            return None

    def alive(self, boot: str) -> bool:
        """Whether the process that writes this segment is running now."""
        return self.boot == boot and process_start(self.pid) == self.start


@dataclass
class Contents:
    """What a segment holds (:func:`read_segment`)."""

    puts: dict[str, bytes] = field(default_factory=dict)
    """Item ID -> its item file's bytes."""
    done: set[str] = field(default_factory=set)
    left: set[str] = field(default_factory=set)
    """Items that left after deliveries written without fsync (``L`` records)."""
    filed: set[str] = field(default_factory=set)
    """Items whose file was written before their state (``F`` records)."""
    torn: bool = False
    """The segment ends with an incomplete or damaged record (written, never synced)."""


def read_segment(path: Path) -> Contents:
    """The records of one segment, up to the first incomplete or damaged one."""
    out = Contents()
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        out.torn = bool(data)
        return out
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        out.torn = True
        return out
    pos = end + 1
    tail = len(data.rstrip(b"\0"))  # what follows is a spare's zeros: no more records
    while pos < tail:
        if pos + _REC.size > len(data):
            out.torn = True
            break
        kind, _flags, id_len, size, crc = _REC.unpack_from(data, pos)
        start = pos + _REC.size
        stop = start + id_len + size
        if stop > len(data):
            out.torn = True
            break
        ident = data[start:start + id_len]
        payload = data[start + id_len:stop]
        if zlib.crc32(payload, zlib.crc32(kind + ident)) != crc:
            out.torn = True
            break
        item_id = ident.decode("ascii", "replace")
        if kind == PUT:
            out.puts[item_id] = payload
        elif kind == DONE:
            out.done.add(item_id)
        elif kind == LEFT:
            out.left.add(item_id)
        elif kind == FILED:
            out.filed.add(item_id)
        pos = stop
    return out


def read_roots(directory: Path) -> list[str]:
    """The roots listed in ``directory``'s :data:`ROOTS_FILE`."""
    try:
        text = (directory / ROOTS_FILE).read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return []
    return [line for line in text.splitlines() if line]
