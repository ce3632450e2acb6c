"""The reception side under attack, over real sockets (issue "hold under attack").

1. Ghost STARTTLS sessions (silent after ``220``, a stalled or reset handshake) give back
   their max_connections slot and their per-address slot at the handshake deadline; a
   SIGTERM does not wait for them.
2. Slowloris: a command line trickled byte by byte, a session that never ends, a DATA
   transfer below ``min_data_rate`` or past its deadline are dropped with ``421`` while
   normal mail flows.
3. DATA or command lines without CRLF: nothing is buffered past the limits; the peak RSS of a
   ``tampu serve`` stays bounded with several such clients at once.
4. Many large messages at once: the bodies stay within ``[server] reception_memory`` (452 past
   it, at MAIL FROM when SIZE says so), and the memory goes back to the system afterwards.
5. Hostile input gets its permanent reply at the command, never a traceback.

Each test is bounded in time; the figures they measure are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import ssl
import struct
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tampu.testing import make_config_dir
from tests.helpers import ENHANCED, RawClient, free_ports, serving

MB = 1024 * 1024


# ---------------------------------------------------------------------------- helpers


def serve_config(root: Path, port: int, server: str = "", plugins: str = "",
                 users: dict[str, str] | None = None) -> Path:
    """A configuration for ``tampu serve`` with one smtp listener on ``port``."""
    return make_config_dir(root, users=users or {"user@example.test": "pw"},
                           base=textwrap.dedent("""\
        [server]
        hostname = "localhost"
        local_domains = ["example.test"]
        shutdown_timeout = 10
        max_queue_items = 1000
        log_level = "info"
        """) + textwrap.dedent(server) + textwrap.dedent(f"""
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{port}"]
        [plugins.localusers]
        enabled = true
        """) + textwrap.dedent(plugins))


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def settle(pid: int, target: int, timeout: float = 6.0) -> int:
    """VmRSS once it is at most ``target`` MiB (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        rss = memory(pid)["VmRSS"]
        if rss <= target or time.monotonic() > deadline:
            return rss
        time.sleep(0.1)


def assert_clean_log(text: str) -> None:
    for bad in ("Traceback", "--- Logging error ---", "internal error", "RuntimeError",
                "Exception in callback", "Task exception was never retrieved"):
        assert bad not in text, f"{bad!r} in the server log:\n{text[-4000:]}"


def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello record)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16
    return hello


def read_reply(sock: socket.socket, buf: bytearray) -> bytes:
    """The last line of one (multi-line) reply."""
    while True:
        while b"\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed ({bytes(buf)!r})")
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\r\n")
        buf[:] = rest
        if line[3:4] != b"-":
            return line


def ghost(port: int, source: str, mode: str, hello: bytes) -> socket.socket | None:
    """A client that sends STARTTLS and then stays silent ("silent"), stalls in the
    handshake ("partial"), or resets the connection in it ("reset"). None: refused (421)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    buf = bytearray()
    try:
        if not read_reply(sock, buf).startswith(b"220"):
            sock.close()
            return None
        sock.sendall(b"EHLO ghost.test\r\n")
        assert read_reply(sock, buf).startswith(b"250")
        sock.sendall(b"STARTTLS\r\n")
        assert read_reply(sock, buf).startswith(b"220")
    except ConnectionError:
        sock.close()
        return None
    if mode in ("partial", "reset"):
        sock.sendall(hello[:len(hello) // 2])
    if mode == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        return None
    return sock


def first_reply(port: int, source: str = "127.0.0.1") -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=(source, 0)) as sock:
            return read_reply(sock, bytearray()).decode()
    except (ConnectionError, TimeoutError) as exc:
        return f"no reply: {exc}"


def open_gauge(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=5).read().decode()
    found = re.search(r'^tampu_connections_open\{listener="smtp"\} (\S+)$', body, re.M)
    return float(found.group(1)) if found else 0.0


def send_mail(port: int, body: bytes = b"Subject: ok\r\n\r\nhello\r\n",
              timeout: float = 10) -> tuple[int, str]:
    with RawClient(port, timeout=timeout) as c:
        c.reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(body + b".\r\n")
        code, lines = c.reply()
        c.send("QUIT")
        return code, lines[0]


@contextlib.contextmanager
def closing_all(socks: list[socket.socket | None]) -> Iterator[None]:
    try:
        yield
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()


# ---------------------------------------------------------------------------- 1. ghosts


GHOST_SERVER = """\
    max_connections = 60
    tls_handshake_timeout = 1.5
"""
GHOST_PLUGINS = """
    [plugins.ratelimit]
    enabled = true
    max_concurrent = 3
    max_connections_per_minute = 0
    exempt = []
"""


def _ghost_addresses(n: int) -> list[str]:
    return [f"127.0.{1 + i // 3 // 200}.{2 + i // 3 % 200}" for i in range(n)]


def test_ghost_starttls_sessions_release_their_slots_serve(tmp_path):
    """``tampu serve`` (uvloop): 60 ghosts fill max_connections and their addresses' slots;
    at the handshake deadline every slot is free again; SIGTERM does not wait for ghosts."""
    port, mport = free_ports(2)
    cdir = serve_config(tmp_path / "c", port, GHOST_SERVER, GHOST_PLUGINS + f"""
        [plugins.metrics]
        enabled = true
        address = "127.0.0.1:{mport}"
        """)
    hello = client_hello()
    with serving(cdir, port) as (proc, log):
        sources = _ghost_addresses(60)
        modes = ["silent", "partial"] * 30
        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            ghosts = list(pool.map(lambda a: ghost(port, *a, hello), zip(sources, modes)))
        with closing_all(ghosts):
            held = sum(g is not None for g in ghosts)
            assert held == 60, f"only {held} ghosts got in"
            # While they hold their slots: everyone is locked out, their addresses too
            assert first_reply(port).startswith("421 4.7.0"), "max_connections not reached"
            before = open_gauge(mport)
            # the deadline: every slot given back (the clients are still connected)
            deadline = time.monotonic() + 6
            while open_gauge(mport) > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            released = time.monotonic() - started
            after = open_gauge(mport)
            assert after == 0, f"{after} connections still open"
            assert first_reply(port).startswith("220 "), "still locked out"
            assert first_reply(port, sources[0]).startswith("220 "), "per-address slot held"
            assert send_mail(port)[0] == 250
            print(f"\nghost STARTTLS (serve): {held} ghosts held {before:.0f} slots; "
                  f"{after:.0f} after {released:.1f}s (tls_handshake_timeout 1.5s)")
        # Reset in the handshake: released at once
        for source in sources[:9]:
            assert ghost(port, source, "reset", hello) is None
        assert first_reply(port, sources[0]).startswith("220 ")
        # SIGTERM with 30 ghosts in their handshake: no wait for the shutdown timeout (10s)
        more = [ghost(port, s, m, hello) for s, m in zip(sources[:30], modes)]
        with closing_all(more):
            assert all(g is not None for g in more)
            stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(8) == 0
            took = time.monotonic() - stop
        assert took < 1.2, f"SIGTERM took {took:.1f}s with ghosts open"  # < the deadline
        print(f"SIGTERM with 30 ghosts in a handshake: stopped in {took:.2f}s")
    assert_clean_log(log.read_text())


def test_ghost_starttls_sessions_release_their_slots_asyncio(tampu_server, caplog):
    """The same on the standard asyncio loop (the test kit's server): the connection set
    itself is empty again at the deadline."""
    caplog.set_level(logging.INFO)
    srv = tampu_server(conf={"50-ghost.toml": "[server]\n" + textwrap.dedent(GHOST_SERVER)
                             + textwrap.dedent(GHOST_PLUGINS)})
    port = srv.port("smtp")
    hello = client_hello()
    sources = _ghost_addresses(40)
    ghosts = [ghost(port, s, m, hello) for s, m in zip(sources, ["silent", "partial"] * 20)]
    with closing_all(ghosts):
        assert all(g is not None for g in ghosts)
        state = srv.server.state
        assert len(state.connections) == 40
        # a client from a ghost's address is refused by its per-address limit (3)
        assert first_reply(port, sources[0]).startswith("421 4.7.0")
        deadline = time.monotonic() + 5
        while state.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not state.connections
        assert first_reply(port, sources[0]).startswith("220 ")
        # shutdown with ghosts in the handshake is immediate (well within its deadline)
        more = [ghost(port, s, m, hello) for s, m in zip(sources[:20], ["silent", "partial"] * 10)]
        with closing_all(more):
            start = time.monotonic()
            srv.stop()
            assert time.monotonic() - start < 1.0
    problems = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]


# ---------------------------------------------------------------------------- 2. slowloris


SLOW_SERVER = """\
    command_timeout = 1
    session_timeout = 3
    data_timeout = 1
    min_data_rate = 2000
    max_message_size = 100000
"""


def _dropped(sock: socket.socket, buf: bytearray, send: list[bytes], every: float,
             limit: float) -> tuple[float, bytes]:
    """Send ``send`` (cycled) every ``every`` seconds until the server closes; (seconds it
    took, what the server said meanwhile)."""
    start = time.monotonic()
    sock.settimeout(every)
    i = 0
    while time.monotonic() - start < limit:
        try:
            sock.sendall(send[i % len(send)])
        except OSError:
            break
        i += 1
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
    return time.monotonic() - start, bytes(buf)


def _greeted(port: int) -> tuple[socket.socket, bytearray]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    buf = bytearray()
    assert read_reply(sock, buf).startswith(b"220")
    return sock, buf


def _in_data(port: int) -> tuple[socket.socket, bytearray]:
    sock, buf = _greeted(port)
    for cmd in (b"EHLO slow.test", b"MAIL FROM:<s@example.org>", b"RCPT TO:<user@example.test>",
                b"DATA"):
        sock.sendall(cmd + b"\r\n")
        read_reply(sock, buf)
    return sock, buf


def test_slowloris_clients_are_dropped_while_mail_flows(tmp_path):
    """``tampu serve``: 30 clients trickling a command line, 15 whose session never ends and
    15 sending DATA at 100 B/s are all dropped with 421 at their deadline, while a client
    sends mail normally all along."""
    port, = free_ports(1)
    cdir = serve_config(tmp_path / "c", port, SLOW_SERVER)
    with serving(cdir, port) as (proc, log):
        def trickle_command(_: int) -> tuple[float, bytes]:
            sock, buf = _greeted(port)
            with sock:  # one byte every 0.2s: never a whole line
                return _dropped(sock, buf, [bytes([b]) for b in b"NOOP" * 50], 0.2, 8)

        def endless_session(_: int) -> tuple[float, bytes]:
            sock, buf = _greeted(port)
            with sock:  # a whole command every 0.4s: never idle, never done
                return _dropped(sock, buf, [b"NOOP\r\n"], 0.4, 8)

        def slow_data(_: int) -> tuple[float, bytes]:
            sock, buf = _in_data(port)
            with sock:  # 20 bytes every 0.2s: 100 B/s, under min_data_rate (2000)
                return _dropped(sock, buf, [b"x" * 18 + b"\r\n"], 0.2, 8)

        healthy: list[tuple[int, str, float]] = []

        def mail_flows() -> None:
            for _ in range(12):
                start = time.monotonic()
                code, text = send_mail(port, timeout=5)
                healthy.append((code, text, time.monotonic() - start))
                time.sleep(0.25)

        flow = threading.Thread(target=mail_flows)
        flow.start()
        with ThreadPoolExecutor(60) as pool:
            commands = pool.map(trickle_command, range(30))
            sessions = pool.map(endless_session, range(15))
            datas = pool.map(slow_data, range(15))
            commands, sessions, datas = list(commands), list(sessions), list(datas)
        flow.join(30)
        for took, said in commands:
            assert b"421 4.4.2" in said, said
            assert 0.8 < took < 2.5, took  # command_timeout 1s
        for took, said in sessions:
            assert b"421 4.4.2" in said, said[-200:]
            assert 2.5 < took < 4.5, took  # session_timeout 3s
        for took, said in datas:
            assert b"421 4.4.2 Transfer too slow" in said, said[-200:]
            assert 0.8 < took < 3.0, took  # one window (data_timeout 1s) at 100 B/s
        assert len(healthy) == 12 and all(code == 250 for code, _, _ in healthy), healthy
        assert max(t for _, _, t in healthy) < 2.0
        print(f"\nslowloris: command trickle dropped after "
              f"{max(t for t, _ in commands):.2f}s, endless sessions after "
              f"{max(t for t, _ in sessions):.2f}s, slow DATA after "
              f"{max(t for t, _ in datas):.2f}s; 12 messages at "
              f"{max(t for _, _, t in healthy):.2f}s at most")
        assert first_reply(port).startswith("220 ")
    assert_clean_log(log.read_text())


def test_data_transfer_has_an_absolute_deadline(tampu_server):
    """Fast enough for any rate check, but the transfer deadline (data_timeout, as
    max_message_size / min_data_rate is shorter) ends it with 421."""
    srv = tampu_server(conf={"50-slow.toml": "[server]\ndata_timeout = 1\nmin_data_rate = 0\n"
                             "command_timeout = 5\n"}, users={"user@example.test": "pw"})
    sock, buf = _in_data(srv.port("smtp"))
    with sock:
        took, said = _dropped(sock, buf, [b"y" * 998 + b"\r\n"], 0.05, 6)
    assert b"421 4.4.2" in said and 0.8 < took < 2.5, (took, said[-200:])
    deadline = time.monotonic() + 3
    while srv.server.state.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not srv.server.state.connections
    assert not srv.queue_items()


# ---------------------------------------------------------------------------- 3. no CRLF


def _no_crlf_data(port: int, total: int) -> tuple[int, str]:
    with RawClient(port, timeout=30) as c:
        c.reply()
        c.cmd("EHLO flood.test")
        c.cmd("MAIL FROM:<f@example.org>")
        c.cmd("RCPT TO:<user@example.test>")
        assert c.cmd("DATA")[0] == 354
        blob = b"A" * MB
        for _ in range(total // MB):
            c.send_raw(blob)
        c.send_raw(b"\r\n.\r\n")
        code, lines = c.reply()
        assert c.cmd("NOOP")[0] == 250  # the session goes on, in step
        return code, lines[0]


def _no_crlf_command(port: int, total: int) -> tuple[int, str]:
    with RawClient(port, timeout=30) as c:
        c.reply()
        blob = b"B" * MB
        for _ in range(total // MB):
            c.send_raw(blob)
        code, lines = c.cmd(b"")
        assert c.cmd("NOOP")[0] == 250
        return code, lines[0]


def test_no_crlf_clients_keep_memory_bounded(tmp_path):
    """8 clients each send 24 MB of DATA without a line end, 4 a 16 MB command line: each is
    answered at its end (552 over the size limit, 500 for the command line) and the peak
    RSS of the server grows by far less than what they sent."""
    port, = free_ports(1)
    cdir = serve_config(tmp_path / "c", port, "max_message_size = 5000000\n")
    with serving(cdir, port) as (proc, log):
        send_mail(port)  # warm up (imports, first transaction)
        base = memory(proc.pid)
        with ThreadPoolExecutor(12) as pool:
            datas = [pool.submit(_no_crlf_data, port, 24 * MB) for _ in range(8)]
            commands = [pool.submit(_no_crlf_command, port, 16 * MB) for _ in range(4)]
            data_replies = [f.result(60) for f in datas]
            command_replies = [f.result(60) for f in commands]
        peak = memory(proc.pid)["VmHWM"]
        assert {code for code, _ in data_replies} == {552}, data_replies
        assert all(text.startswith("5.3.4 ") for _, text in data_replies)
        assert {code for code, _ in command_replies} == {500}, command_replies
        assert all(text.startswith("5.5.2 ") for _, text in command_replies)
        grown = peak - base["VmHWM"]
        print(f"\nno CRLF: 8x24 MB DATA + 4x16 MB command lines (256 MB sent): peak RSS "
              f"{peak} MiB, {grown} MiB over the {base['VmHWM']} MiB before")
        assert grown < 40, f"peak RSS grew by {grown} MiB"
        assert send_mail(port)[0] == 250
    assert_clean_log(log.read_text())


# ---------------------------------------------------------------------------- 4. big messages


def _big(port: int, size: int, *, declare: bool = False) -> tuple[int, str]:
    line = b"y" * 76 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (size // len(line))
    with RawClient(port, timeout=60) as c:
        c.reply()
        c.cmd("EHLO big.test")
        size_param = f" SIZE={len(body)}" if declare else ""
        code, lines = c.cmd(f"MAIL FROM:<b@example.org>{size_param}")
        if code != 250:
            return code, lines[0]
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        for i in range(0, len(body), MB):
            c.send_raw(body[i:i + MB])
        c.send_raw(b".\r\n")
        code, lines = c.reply()
        return code, lines[0]


def test_ten_big_messages_at_once_memory_goes_back(tmp_path):
    """10 concurrent 20 MB messages are all queued; afterwards the RSS is back near where it
    was before (large blocks are their own mappings, the arenas are trimmed)."""
    port, = free_ports(1)
    cdir = serve_config(tmp_path / "c", port)
    with serving(cdir, port) as (proc, log):
        send_mail(port)
        base = memory(proc.pid)
        start = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(lambda _: _big(port, 20 * MB), range(10)))
        took = time.monotonic() - start
        peak = memory(proc.pid)["VmHWM"]
        assert [code for code, _ in replies] == [250] * 10, replies
        after = settle(proc.pid, base["VmRSS"] + 25)
        print(f"\n10x20 MB at once: {took:.1f}s; RSS {base['VmRSS']} MiB before, peak "
              f"{peak} MiB, {after} MiB after")
        assert after <= base["VmRSS"] + 25, f"{after} MiB resident after, {base} before"
        assert peak - base["VmHWM"] < 350
    assert_clean_log(log.read_text())


def test_reception_memory_budget_answers_452(tmp_path):
    """With reception_memory = 40 MB: while one client holds 25 MB in its transfer, a MAIL
    FROM declaring 20 MB gets 452 at once, and an undeclared 20 MB transfer gets 452 at its
    end; once the first is queued, the same message is accepted."""
    port, = free_ports(1)
    cdir = serve_config(tmp_path / "c", port, "max_message_size = 30000000\n"
                        "reception_memory = 40000000\n")
    with serving(cdir, port) as (proc, log):
        send_mail(port)
        base = memory(proc.pid)
        holder = RawClient(port, timeout=30)
        with holder:
            holder.reply()
            holder.cmd("EHLO holder.test")
            holder.cmd("MAIL FROM:<h@example.org>")
            holder.cmd("RCPT TO:<user@example.test>")
            assert holder.cmd("DATA")[0] == 354
            line = b"h" * 76 + b"\r\n"
            chunk = line * (MB // len(line))
            for _ in range(25):
                holder.send_raw(chunk)
            time.sleep(0.5)  # the server has read it
            code, text = _big(port, 20 * MB, declare=True)
            assert (code, text[:6]) == (452, "4.3.1 "), (code, text)
            code, text = _big(port, 20 * MB)
            assert (code, text[:6]) == (452, "4.3.1 "), (code, text)
            holder.send_raw(b".\r\n")
            assert holder.reply()[0] == 250
        assert _big(port, 20 * MB, declare=True)[0] == 250
        peak = memory(proc.pid)["VmHWM"]
        after = settle(proc.pid, base["VmRSS"] + 25)
        print(f"\nreception_memory 40 MB: 452 at MAIL FROM and after DATA; RSS "
              f"{base['VmRSS']} MiB before, peak {peak} MiB, {after} MiB after")
        assert peak - base["VmHWM"] < 40 + 2 * 20 + 20
        assert after <= base["VmRSS"] + 25
        assert "refused with 452" in log.read_text()
    assert_clean_log(log.read_text())


# ---------------------------------------------------------------------------- 5. hostile input


HOSTILE = [
    (b"VRFY @\xff", 501, "5.5.2"),
    (b"EHLO \xff\xfe", 501, "5.5.2"),
    (b"HELO a\x00b", 501, "5.5.4"),
    (b"MAIL FROM:<a@", 501, "5.1.7"),
    (b"MAIL FROM:<a@b", 501, "5.1.7"),
    (b"MAIL FROM:<a@b\x00c.example>", 501, "5.1.7"),
    (b"MAIL FROM:<a@\xff.example>", 501, "5.1.7"),
    (b"MAIL FROM:<\xc3(@example.org>", 501, "5.1.7"),
    (b"MAIL FROM:<a@example.org> SIZE=\xff", 501, "5.1.7"),
    (b"MAIL FROM:<a@example.org> X-FOO=bar", 555, "5.5.4"),
    (b"MAIL FROM:<a@example.org> BODY=\x00", 555, "5.5.4"),
    (b"MAIL FROM:<\xc3\xb1@example.org>", 553, "5.6.7"),
    (b"MAIL FROM:<a@-bad-.example>", 553, "5.1.8"),
    (b"MAIL FROM:<a@exa mple.org>", 553, "5.1.8"),
    (b"MAIL FROM:<a@example.org>>", 501, "5.1.7"),
    (b"MA\x00IL FROM:<a@example.org>", 500, "5.5.1"),
    (b"\xff\xfe\xfd", 500, "5.5.1"),
]
RCPT_HOSTILE = [
    (b"RCPT TO:<\xff@example.test>", 501, "5.1.3"),
    (b"RCPT TO:<user@example.test\x00>", 501, "5.1.3"),
    (b"RCPT TO:<user@example.test", 501, "5.1.3"),
    (b"RCPT TO:<user@[300.1.1.1]>", 553, "5.1.3"),
    (b"RCPT TO:<user@example.test> NOTIFY=\xff", 501, "5.1.3"),
]


def _no_problems(caplog: pytest.LogCaptureFixture) -> None:
    problems = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
                or "internal error" in r.getMessage()]
    assert not problems, [r.getMessage() for r in problems]


@pytest.fixture
def hostile_server(tampu_server: Any) -> Any:
    return tampu_server(users={"user@example.test": "pw"},
                        conf={"50-log.toml": "[plugins.maillog]\nenabled = true\n"})


def test_hostile_commands_get_their_permanent_reply(hostile_server, caplog):
    caplog.set_level(logging.INFO)
    port = hostile_server.port("smtp")
    for line, code, status in HOSTILE + [(b"", 0, "")] + RCPT_HOSTILE:
        if not line:  # the RCPT cases run within a transaction
            continue
        with RawClient(port) as c:
            c.reply()
            assert c.cmd("EHLO client.test")[0] == 250
            if line.startswith(b"RCPT"):
                assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
            got, lines = c.cmd(line)
            assert (got, lines[0].split(" ")[0]) == (code, status), (line, got, lines)
            assert re.match(ENHANCED, lines[0].split(" ")[0])
            assert c.cmd("NOOP")[0] == 250, line  # the session is still in step
    assert send_mail(port)[0] == 250
    _no_problems(caplog)
    # the mail log has every refusal, with what could not be printed escaped
    log = hostile_server.config_dir_data / "mail.log"
    deadline = time.monotonic() + 3
    while "refused RCPT" not in (log.read_text() if log.exists() else "") \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    # a refused path is logged as it was written (here: unbalanced), controls blanked
    assert "refused MAIL <a@ by core - 501 5.1.7" in text, text
    assert "refused MAIL <a@b by core - 501 5.1.7" in text
    assert "refused MAIL <a@b c.example> by core" in text
    assert "\x00" not in text


@pytest.mark.parametrize("after", [b"EHLO plain.test\r\n", b"QUIT\r\n", b""])
def test_plain_text_after_starttls_gets_a_permanent_reply(hostile_server, caplog, after):
    caplog.set_level(logging.INFO)
    with RawClient(hostile_server.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("STARTTLS")[0] == 220
        if after:
            c.send_raw(after)
            code, lines = c.reply()
            assert (code, lines[0][:6]) == (500, "5.5.1 "), lines
        else:
            c.sock.shutdown(socket.SHUT_WR)  # gone without a handshake
        assert c.closed_by_server()
    _no_problems(caplog)
    assert send_mail(hostile_server.port("smtp"))[0] == 250


def test_log_lines_are_written_whatever_they_contain(tmp_path):
    """With a server log whose encoding cannot represent the input (ASCII, strict), every
    line is written, escaped; nothing breaks the logging module."""
    port, = free_ports(1)
    cdir = serve_config(tmp_path / "c", port, plugins="[plugins.maillog]\nenabled = true\n")
    env = {**os.environ, "PYTHONIOENCODING": "ascii:strict", "LC_ALL": "C"}
    with _serving_env(cdir, port, env) as (proc, log):
        with RawClient(port) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<ñandú@example.org> SMTPUTF8")[0] == 250
            assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send_raw(b"Subject: \xc3\xb1\r\n\r\nhi\r\n.\r\n")
            assert c.reply()[0] == 250
            assert c.cmd(b"VRFY @\xff")[0] == 501
            assert c.cmd(b"MAIL FROM:<a@b\x00c.example>")[0] == 501
            c.send("QUIT")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    text = log.read_text()
    assert_clean_log(text)
    assert r"from=<\xf1and\xfa@example.org>" in text, text[-2000:]
    mail_log = (cdir / "data" / "mail.log").read_text(encoding="utf-8")
    assert "from=<ñandú@example.org> queued" in mail_log


@contextlib.contextmanager
def _serving_env(root: Path, port: int, env: dict[str, str]) -> Iterator[Any]:
    import subprocess

    from tests.helpers import tampu_command, wait_for_port

    log = root / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([*tampu_command(), "serve", "--config-dir", str(root)],
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=env)
    try:
        wait_for_port(port, proc=proc)
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
