"""Fuzzing the reception side.

* Properties of :class:`tampu.smtp_wire.Wire` over a real socket pair (hypothesis): a DATA
  transfer and command lines read the same whatever the chunking of the input; dot-unstuffing
  matches a reference; long lines are refused by the same rule; the reader stays in step.
* A seeded mutator drives random and mutated command lines, bodies and TLS starts at a
  running ``tampu serve`` (300 sessions, 8 at a time): every line gets a well-formed reply
  within the deadlines, a health transaction succeeds every 50 sessions, and the server log
  has no traceback at the end.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import ssl
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tampu.smtp_wire import Closed, LineTooLong, Wire
from tampu.testing import default_ca, make_config_dir
from tests.helpers import free_ports, serving

END = b"\r\n.\r\n"
LIMIT = 100


# ---------------------------------------------------------------------------- Wire properties


def _sanitized(content: bytes) -> bytes:
    """``content`` with every CRLF-dot-CRLF before the end broken (a dot line would end the
    transfer early)."""
    while True:
        framed = b"\r\n" + content + END
        i = framed.find(END)
        if i == len(framed) - len(END):
            return content
        content = content[:i + 1] + b"x" + content[i + 1:]


def _reference(content: bytes) -> tuple[bytes, bool]:
    """What the client means by sending ``content`` + CRLF.CRLF: the unstuffed message, and
    whether a line (CRLF-delimited) is longer than the limit."""
    message = (b"\r\n" + content + b"\r\n").replace(b"\r\n.", b"\r\n")[2:]
    return message, max(map(len, message.split(b"\r\n"))) > LIMIT - 2


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    out, pos = [], 0
    for cut in cuts:
        if pos >= len(data):
            break
        out.append(data[pos:pos + cut])
        pos += cut
    if pos < len(data):
        out.append(data[pos:])
    return out


async def _over_socket(chunks: list[bytes], reader: Any) -> Any:  # noqa: ANN401
    """Feed ``chunks`` (one send each, the loop running in between) to a Wire over a real
    socket pair and return what ``reader(wire)`` returns."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    wire = Wire(LIMIT)
    try:
        transport, _ = await loop.connect_accepted_socket(lambda: wire, ours)
        task = asyncio.ensure_future(reader(wire))
        for chunk in chunks:
            theirs.sendall(chunk)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        result = await asyncio.wait_for(task, 5)
        transport.close()
        await asyncio.sleep(0)
        return result
    finally:
        theirs.close()


PIECES = st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"x" * 60, b"\x00", b"\xff", b"\r\n.",
                          b"..", b"y", b"\r\n..", b".\r\n", b"z" * 99])
CONTENT = st.one_of(st.binary(max_size=600),
                    st.lists(PIECES, max_size=40).map(b"".join))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=CONTENT, cuts=st.lists(st.integers(1, 64), max_size=30))
def test_data_reading_does_not_depend_on_chunking(content, cuts):
    content = _sanitized(content)
    expected, too_long = _reference(content)
    data = content + END + b"NOOP\r\n"

    async def read(wire: Wire) -> tuple[Any, bytes]:
        result = await wire.read_data(10**6, wire.loop.time() + 5, 0)
        return result, await wire.readline(wire.loop.time() + 5)

    result, after = asyncio.run(_over_socket(_chunks(data, cuts), read))
    assert after == b"NOOP"  # in step: nothing of the transfer is left, nothing more taken
    assert result.line_too_long == too_long
    if too_long:
        assert result.message is None
    else:
        assert result.message == expected
        assert result.size == len(expected)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.binary(max_size=2 * LIMIT).map(lambda b: b.replace(b"\n", b"")),
                      min_size=1, max_size=12),
       bare_lf=st.booleans(), cuts=st.lists(st.integers(1, 80), max_size=40))
def test_command_lines_do_not_depend_on_chunking(lines, bare_lf, cuts):
    ending = b"\n" if bare_lf else b"\r\n"
    data = b"".join(line + ending for line in lines)

    async def read(wire: Wire) -> list[bytes | None]:
        out: list[bytes | None] = []
        for _ in lines:
            try:
                out.append(await wire.readline(wire.loop.time() + 5))
            except LineTooLong:
                out.append(None)
        return out

    got = asyncio.run(_over_socket(_chunks(data, cuts), read))
    for line, read_line in zip(lines, got, strict=True):
        if len(line) + len(ending) > LIMIT:
            assert read_line is None
        else:
            assert read_line == (line[:-1] if line.endswith(b"\r") and bare_lf else line)


def test_unfinished_line_is_not_kept():
    """3 MB without a line end: the input buffer never holds more than the limit and a
    little, and the line is refused when it ends."""
    async def read(wire: Wire) -> tuple[bool, int]:
        try:
            await wire.readline(wire.loop.time() + 5)
        except LineTooLong:
            return True, len(wire._buf)
        return False, len(wire._buf)

    biggest = [0]

    async def watch(wire: Wire) -> tuple[bool, int]:
        async def sample() -> None:
            while True:
                biggest[0] = max(biggest[0], len(wire._buf))
                await asyncio.sleep(0)

        sampler = asyncio.ensure_future(sample())
        try:
            return await read(wire)
        finally:
            sampler.cancel()

    refused, left = asyncio.run(_over_socket([b"A" * 65536] * 48 + [b"\r\nNOOP\r\n"], watch))
    assert refused and left == len(b"NOOP\r\n")
    assert biggest[0] < 512 * 1024


def test_closed_connection_ends_a_transfer():
    async def read(wire: Wire) -> str:
        try:
            await wire.read_data(10**6, wire.loop.time() + 5, 0)
        except Closed as exc:
            return str(exc)
        return "not closed"

    async def run() -> str:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        wire = Wire(LIMIT)
        transport, _ = await loop.connect_accepted_socket(lambda: wire, ours)
        task = asyncio.ensure_future(read(wire))
        theirs.sendall(b"half a message\r\n")
        await asyncio.sleep(0.01)
        theirs.close()
        result = await asyncio.wait_for(task, 5)
        transport.close()
        await asyncio.sleep(0)
        return result

    assert asyncio.run(run()) == "closed"


# ---------------------------------------------------------------------------- server fuzz


SESSIONS = 300
PARALLEL = 8
CORPUS = [
    b"EHLO client.test", b"HELO client.test", b"MAIL FROM:<sender@example.org>",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME", b"MAIL FROM:<s@example.org> SMTPUTF8",
    b"MAIL FROM:<s@example.org> RET=HDRS ENVID=abc", b"RCPT TO:<user@example.test>",
    b"RCPT TO:<user@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user@example.test",
    b"RCPT TO:<Postmaster>", b"RCPT TO:<other@example.org>", b"RSET", b"NOOP", b"HELP",
    b"VRFY user", b"EXPN list", b"AUTH PLAIN AHVzZXIAcHc=", b"AUTH LOGIN", b"DATA",
    b"STARTTLS", b"BDAT 10 LAST", b"GET / HTTP/1.1", b"QUIT",
    b"MAIL FROM:<\xc3\xb1@example.org> SMTPUTF8", b"RCPT TO:<user@[127.0.0.1]>",
]
INTERESTING = [b"\x00", b"\xff", b"\r", b"<", b">", b"@", b":", b" ", b"=", b"\x80", b"\xc3",
               b"\xc3\xb1", b".", b",", b";", b"\"", b"\\", b"[", b"]", b"\t", b"%", b"+"]
REPLY = re.compile(rb"^([2-5])\d\d([ -])")
ENHANCED = re.compile(rb"^([2-5])\d\d[ -]([245])\.\d{1,3}\.\d{1,3}( |$)")
NO_ENHANCED = (b"220", b"221", b"250", b"334", b"214", b"354")  # greeting, EHLO lines...


def mutate(rng: random.Random, line: bytes) -> bytes:
    """One to four random edits of ``line`` (most often of its argument only, so that the
    command's own parsing is reached); never a line feed (one line, one reply)."""
    if rng.random() < 0.6:
        verb, _, rest = line.partition(b" ")
        if not rest or rng.random() < 0.2:
            rest = rng.choice(CORPUS).partition(b" ")[2] or b"x"
        return verb + b" " + _edit(rng, rest)
    return _edit(rng, line)


def _edit(rng: random.Random, line: bytes) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randint(0, len(data))
        if op == 0 and data:  # flip a byte
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256)
        elif op == 1:  # insert something interesting
            data[pos:pos] = rng.choice(INTERESTING)
        elif op == 2 and data:  # delete a range
            data[pos:pos + rng.randint(1, 8)] = b""
        elif op == 3:  # repeat a range (long lines too)
            piece = bytes(data[pos:pos + rng.randint(1, 10)]) or b"x"
            data[pos:pos] = piece * rng.choice([2, 10, 100, 300])
        elif op == 4:  # truncate
            del data[pos:]
        elif op == 5:  # splice another command
            data[pos:pos] = rng.choice(CORPUS)
        else:  # case change
            data[:] = data.swapcase()
    return bytes(data).replace(b"\n", b"")


def body(rng: random.Random) -> bytes:
    """A mutated message body that ends (only) at its CRLF.CRLF."""
    parts = [b"Subject: fuzz\r\n\r\n"]
    for _ in range(rng.randint(0, 30)):
        parts.append(rng.choice([b"line\r\n", b".dot\r\n", b"..\r\n", b"\n", b"\r", b"\x00",
                                 b"\xff\xfe", b"x" * rng.choice([10, 500, 999, 1200]) + b"\r\n",
                                 b"\r\n.\n", b"\n.\r\n", b"\r\n", b"From: a@b\r\n"]))
    if rng.random() < 0.1:
        parts.append(b"y" * 30000)  # over max_message_size
    content = b"".join(parts)
    while True:  # no early end: break every CRLF.CRLF but the last
        framed = b"\r\n" + content + END
        i = framed.find(END)
        if i == len(framed) - len(END):
            return content + END
        content = content[:i + 1] + b"x" + content[i + 1:]


class Conn:
    """A client connection that checks every reply it reads."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=6)
        self.buf = b""
        self.closed = False

    def reply(self) -> bytes:
        """The last line of one reply; the format of each line is checked."""
        while True:
            while b"\r\n" not in self.buf:
                try:
                    chunk = self.sock.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    chunk = b""
                if not chunk:
                    self.closed = True
                    raise EOFError(self.buf)
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            m = REPLY.match(line)
            assert m, f"not a reply line: {line!r}"
            code = line[:3]
            if code[0:1] in b"45" and code not in NO_ENHANCED:
                e = ENHANCED.match(line)
                assert e and e.group(2) == line[:1], f"no enhanced code: {line!r}"
            if m.group(2) == b" ":
                return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    default_ca().configure_trust(ctx)
    return ctx


def one_session(port: int, seed: int) -> str:
    """A random session; raises AssertionError on a bad reply, TimeoutError on a hang.
    Returns how it ended."""
    rng = random.Random(seed)
    conn = Conn(port)
    try:
        assert conn.reply().startswith(b"220 ")
        for step in range(rng.randint(3, 25)):
            action = rng.random()
            if action < 0.45:  # one mutated (or plain) command
                line = rng.choice(CORPUS)
                if rng.random() < 0.7:
                    line = mutate(rng, line)
                conn.send(line + b"\r\n")
                last = conn.reply()
                if last.startswith(b"354"):
                    conn.send(body(rng))
                    conn.reply()
                elif last.startswith(b"334"):
                    conn.send(rng.choice([b"*", b"\xff\xff", b"AAAA", b"=" * 50]) + b"\r\n")
                    if conn.reply().startswith(b"334"):
                        conn.send(b"*\r\n")
                        conn.reply()
                elif last.startswith(b"220"):  # STARTTLS
                    return tls_variant(rng, conn)
                elif last[:3] in (b"221", b"421"):
                    return last[:3].decode()
            elif action < 0.65:  # a whole transaction with a mutated body
                for cmd in (b"EHLO fuzz.test", b"MAIL FROM:<f@example.org>",
                            b"RCPT TO:<user@example.test>", b"DATA"):
                    conn.send(cmd + b"\r\n")
                    last = conn.reply()
                    if last[:3] == b"421":
                        return "421"
                if last.startswith(b"354"):
                    conn.send(body(rng))
                    conn.reply()
                elif last[:3] == b"421":
                    return "421"
            elif action < 0.8:  # a pipelined burst (no command that changes the mode)
                burst: list[bytes] = []
                while len(burst) < rng.randint(2, 8):
                    line = mutate(rng, rng.choice(CORPUS))
                    word = line.split(b" ")[0].upper()
                    if not any(w in word for w in (b"DATA", b"AUTH", b"STARTTLS", b"QUIT")) \
                            and b"HTTP" not in line.upper() \
                            and not line.startswith((b"\x16", b"\x80")):
                        burst.append(line)
                conn.send(b"".join(line + b"\r\n" for line in burst))
                for _ in burst:
                    if conn.reply()[:3] == b"421":
                        return "421"
            elif action < 0.86:  # garbage without a line end, then one
                conn.send(b"X" + bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000)))
                          .replace(b"\n", b"") + b"\r\n")
                if conn.reply()[:3] == b"421":
                    return "421"
            elif action < 0.88:  # another protocol: closed without a word
                conn.send(rng.choice([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                      b"\x16\x03\x01\x00\x05hello", b"\x80\x2e\x01\x00\x02"]))
                try:
                    if conn.reply()[:3] == b"421":  # the error budget was spent before
                        return "421"
                except EOFError as exc:
                    assert not exc.args[0], f"a reply to another protocol: {exc.args[0]!r}"
                    return "not SMTP"
                raise AssertionError("another protocol got a reply")
            elif action < 0.96 or step < 2:  # STARTTLS, then one of the TLS variants
                conn.send(b"STARTTLS\r\n")
                last = conn.reply()
                if last.startswith(b"220"):
                    return tls_variant(rng, conn)
                if last[:3] == b"421":
                    return "421"
            else:  # gone, in the middle of a command
                conn.send(mutate(rng, rng.choice(CORPUS))[:rng.randint(0, 20)])
                return "left"
        conn.send(b"QUIT\r\n")
        assert conn.reply()[:3] in (b"221", b"421")
        return "quit"
    except EOFError:
        return "closed"  # the server may close (not SMTP, too many errors, a refused TLS)
    finally:
        conn.close()


def tls_variant(rng: random.Random, conn: Conn) -> str:
    choice = rng.randrange(4)
    if choice == 0:  # a real handshake, then a few commands inside TLS
        conn.sock = _tls_context().wrap_socket(conn.sock, server_hostname="localhost")
        for _ in range(rng.randint(1, 4)):
            conn.send(mutate(rng, rng.choice(CORPUS[:16])) + b"\r\n")
            last = conn.reply()
            if last.startswith(b"334"):
                conn.send(b"*\r\n")
                conn.reply()
            if last.startswith(b"354"):
                conn.send(body(rng))
                conn.reply()
        return "tls"
    if choice == 1:  # plain text: 500, closed
        conn.send(mutate(rng, rng.choice(CORPUS)) + b"\r\n")
        last = conn.reply()
        assert last.startswith(b"500 5.5.1"), last
        return "plain after STARTTLS"
    if choice == 2:  # a broken handshake
        conn.send(b"\x16\x03\x01" + bytes(rng.randrange(256) for _ in range(rng.randint(2, 300))))
        conn.sock.settimeout(4)
        try:
            while conn.sock.recv(65536):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
        return "bad handshake"
    return "left in STARTTLS"


def test_fuzzed_sessions_get_answers_and_no_traceback(tmp_path):
    port, = free_ports(1)
    cdir = make_config_dir(tmp_path / "c", users={"user@example.test": "pw"},
                           base=textwrap.dedent(f"""\
        [server]
        hostname = "localhost"
        local_domains = ["example.test"]
        command_timeout = 2
        session_timeout = 15
        data_timeout = 2
        tls_handshake_timeout = 1.5
        max_message_size = 20000
        max_errors = 10
        max_queue_items = 5000
        shutdown_timeout = 2
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{port}"]
        [plugins.localusers]
        enabled = true
        [plugins.auth]
        enabled = true
        [plugins.maillog]
        enabled = true
        [plugins.loopdetect]
        enabled = true
        """))
    from tests.core.test_attack import assert_clean_log, send_mail

    start = time.monotonic()
    with serving(cdir, port) as (proc, log):
        outcomes: dict[str, int] = {}
        lock = threading.Lock()
        failures: list[str] = []

        def run(seed: int) -> None:
            try:
                how = one_session(port, seed)
            except (AssertionError, TimeoutError, OSError) as exc:
                failures.append(f"seed {seed}: {type(exc).__name__}: {exc}")
                return
            with lock:
                outcomes[how] = outcomes.get(how, 0) + 1

        for batch in range(0, SESSIONS, 50):
            with ThreadPoolExecutor(PARALLEL) as pool:
                list(pool.map(run, range(batch, batch + 50)))
            code, text = send_mail(port)
            assert code == 250, f"health transaction after {batch + 50} sessions: {text}"
            assert not failures, failures[:5]
        took = time.monotonic() - start
        print(f"\nfuzz: {SESSIONS} sessions in {took:.1f}s: {dict(sorted(outcomes.items()))}")
        assert proc.poll() is None
    assert took < 60
    assert sum(outcomes.values()) == SESSIONS
    assert_clean_log(log.read_text())
    assert " ERROR " not in log.read_text(), log.read_text()[-3000:]
