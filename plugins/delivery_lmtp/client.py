"""A small LMTP client (RFC 2033) on asyncio streams.

One session delivers one message: ``LHLO``, ``MAIL FROM``, one ``RCPT TO`` per recipient,
``DATA``, then one reply per accepted recipient, and ``QUIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field

MAX_REPLY_LINES = 100
MAX_LINE = 4096

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s*")


class LmtpError(Exception):
    """The session broke: connection closed, garbled reply. Always a temporary failure."""


@dataclass(frozen=True, slots=True)
class LmtpReply:
    code: int
    enhanced: str
    text: str
    lines: tuple[str, ...] = ()
    """The text of each line (a multi-line reply, like LHLO's keywords)."""

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.enhanced, self.text) if p)


@dataclass
class LmtpOutcome:
    """What the server said: one reply per recipient, or the reply that ended the session."""

    per_recipient: dict[str, LmtpReply] = field(default_factory=dict)
    session_reply: LmtpReply | None = None
    """Set when the greeting, LHLO, MAIL FROM or DATA was refused (applies to everyone)."""
    stage: str = ""


def parse_reply(lines: list[bytes]) -> LmtpReply:
    code = int(lines[0][:3])
    texts = [ln[4:].decode("utf-8", "replace").strip() for ln in lines]
    enhanced = ""
    match = _ENHANCED.match(texts[0])
    if match and match.group(1) == str(code)[0]:
        enhanced = ".".join(match.groups())
        texts = [_ENHANCED.sub("", t, count=1) for t in texts]
    return LmtpReply(code, enhanced, "; ".join(t for t in texts if t), tuple(texts))


def dot_stuff(message: bytes) -> bytes:
    """CRLF line endings, leading dots doubled, and the final ``.`` line."""
    data = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class LmtpSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions: set[str] = set()

    async def read_reply(self) -> LmtpReply:
        lines: list[bytes] = []
        while len(lines) < MAX_REPLY_LINES:
            try:
                line = await self.reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                raise LmtpError("connection closed by the LMTP server") from None
            except asyncio.LimitOverrunError:
                raise LmtpError("reply line too long") from None
            line = line.rstrip(b"\r\n")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise LmtpError(f"garbled reply {line[:80]!r}")
            lines.append(line)
            if line[3:4] != b"-":
                return parse_reply(lines)
        raise LmtpError("reply has too many lines")

    async def command(self, line: str) -> LmtpReply:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        return await self.read_reply()

    def abort(self) -> None:
        """Drop the connection at once (timeout, broken session)."""
        self.writer.transport.abort()
        self.writer.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.writer.write(b"QUIT\r\n")
                await self.writer.drain()
                await asyncio.wait_for(self.read_reply(), 2)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def deliver(self, *, lhlo: str, mail_from: str, recipients: list[str],
                      message: bytes, smtputf8: bool) -> LmtpOutcome:
        out = LmtpOutcome()
        greeting = await self.read_reply()
        if not greeting.ok:
            out.session_reply, out.stage = greeting, "greeting"
            return out
        reply = await self.command(f"LHLO {lhlo}")
        if not reply.ok:
            out.session_reply, out.stage = reply, "LHLO"
            return out
        self.extensions = {ln.split()[0].upper() for ln in reply.lines[1:] if ln.split()}
        params = ""
        if "8BITMIME" in self.extensions and any(b > 127 for b in message):
            params += " BODY=8BITMIME"
        if smtputf8 and "SMTPUTF8" in self.extensions:
            params += " SMTPUTF8"
        reply = await self.command(f"MAIL FROM:<{mail_from}>{params}")
        if not reply.ok:
            out.session_reply, out.stage = reply, "MAIL FROM"
            return out
        accepted = []
        for rcpt in recipients:
            reply = await self.command(f"RCPT TO:<{rcpt}>")
            if reply.ok:
                accepted.append(rcpt)
            else:
                out.per_recipient[rcpt] = reply
        if not accepted:
            out.stage = "RCPT TO"
            return out
        reply = await self.command("DATA")
        if reply.code != 354:
            out.session_reply, out.stage = reply, "DATA"
            return out
        self.writer.write(dot_stuff(message))
        await self.writer.drain()
        out.stage = "end of data"
        for rcpt in accepted:  # RFC 2033 4.2: one reply per accepted recipient, in order
            out.per_recipient[rcpt] = await self.read_reply()
        return out


async def open_session(*, host: str | None = None, port: int = 24,
                       socket_path: str | None = None) -> LmtpSession:
    if socket_path is not None:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=MAX_LINE)
    else:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_LINE)
    return LmtpSession(reader, writer)
