"""Helpers shared by the benchmarks.

* ports and waiting for a server; starting and stopping processes by PID;
* configuration directories: :func:`write_bench_config` (a benchmark ``[server]`` with the
  shipped plugin files) and :func:`write_shipped_config` (the shipped conf.d as it is, with
  only ports, hostname, dns_servers and a certificate changed); users, certificate, DKIM key;
* :class:`LoopbackDns`: TXT records served on loopback by Debian's dnsmasq (a C server, so
  the benchmark's DNS does not eat the CPU being measured) or by ``tests/dnsserver.py``;
* the server's cost from ``/proc``: :func:`tree_cpu_seconds` (utime+stime of a process and
  all its descendants, plus cutime+cstime for the children that have exited),
  :func:`tree_memory` (VmRSS and Pss per process), :class:`FsyncCounter` (``strace -f -c``);
* a small asyncio SMTP client (:class:`SmtpClient`) used by accept.py and compare.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import dns.exception

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PASSWORD = "benchpass"
LOCAL_DOMAIN = "example.test"
LOCAL_USER = f"user@{LOCAL_DOMAIN}"
SENDER = "a@example.org"
SENDER_DOMAIN = "example.org"
SPF_RECORD = "v=spf1 ip4:127.0.0.1 -all"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- ports, processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts connections on host:port (or ``proc`` has exited)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}) before listening on "
                             f"{host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.settimeout(2)
                try:
                    s.recv(512)  # the greeting: the server really serves
                except OSError:
                    pass
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def tampu_bin() -> str:
    return shutil.which("tampu") or str(Path(sys.executable).parent / "tampu")


def start(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a server process with its output in ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process (by its PID), then SIGKILL after ``timeout``; then the same for
    any of its descendants (seen before it was signalled) that outlived it."""
    if proc.poll() is not None:
        return
    left = [(pid, _start_time(pid)) for pid in tree_pids(proc.pid) if pid != proc.pid]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    end = time.monotonic() + 10
    for pid, started in left:  # reception workers, still running MDAs: ours, by PID
        while _start_time(pid) == started and started is not None:
            if time.monotonic() > end:
                os.kill(pid, signal.SIGKILL)
                break
            os.kill(pid, signal.SIGTERM)
            time.sleep(0.1)


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by the servers started after)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


# ---------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after ``comm`` (state is [0], ppid [1])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return data[data.rindex(b")") + 2:].decode("ascii").split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants alive now (by parent PID, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root``'s whole process tree: for each
    live process of the tree its utime+stime (all threads) plus cutime+cstime (its children
    that have exited and been reaped). A process that exits between two samples moves from
    the first term to its parent's second, so the difference of two samples is the tree's
    CPU time in between."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields:
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / CLK_TCK


@dataclass
class ProcMemory:
    pid: int
    name: str
    rss_kib: int
    pss_kib: int


def _status_kib(path: str, key: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_memory(root: int) -> list[ProcMemory]:
    """VmRSS and Pss (shared pages divided among their users: the sum does not count the
    pages that forked workers share twice) of each process of the tree."""
    out = []
    for pid in sorted(tree_pids(root)):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        out.append(ProcMemory(pid, name, _status_kib(f"/proc/{pid}/status", "VmRSS:"),
                              _status_kib(f"/proc/{pid}/smaps_rollup", "Pss:")))
    return out


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


ATTACHED = re.compile(r"Process \d+ attached(?: with (\d+) threads)?")


class FsyncCounter:
    """``strace -f -c -e trace=fsync,fdatasync,...`` attached to every thread of a process
    tree; :meth:`stop` detaches it and returns the calls counted per system call."""

    CALLS = "fsync,fdatasync,sync_file_range,syncfs"

    def __init__(self, root: int, out: Path) -> None:
        self.root, self.out = root, out
        self.proc: subprocess.Popen[bytes] | None = None
        self.attached = 0
        self._lines: list[str] = []

    def start(self, timeout: float = 15) -> None:
        strace = shutil.which("strace")
        if strace is None:
            raise SystemExit("strace is not installed (apt-get install strace)")
        pids = tree_pids(self.root)
        tids = [int(t) for pid in pids for t in os.listdir(f"/proc/{pid}/task")]
        argv = [strace, "-f", "-c", "-e", f"trace={self.CALLS}", "-o", str(self.out)]
        for pid in pids:  # with -f, strace attaches to every thread of each process
            argv += ["-p", str(pid)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        stream = self.proc.stderr

        def read() -> None:
            for raw in stream:
                self._lines.append(raw.decode("utf-8", "replace"))
        threading.Thread(target=read, daemon=True).start()
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            self.attached = sum(int(m.group(1) or 1) for ln in list(self._lines)
                                if (m := ATTACHED.search(ln)))
            if self.attached >= len(tids):
                time.sleep(0.2)
                return
            time.sleep(0.05)
        raise SystemExit(f"strace attached to {self.attached} of {len(tids)} threads: "
                         f"{''.join(self._lines[-3:])}")

    def stop(self) -> dict[str, int]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        calls: dict[str, int] = {}
        for line in self.out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in self.CALLS.split(","):
                calls[parts[-1]] = int(parts[3])
        return calls


# ---------------------------------------------------------------------------- DNS on loopback


def txt_strings(text: str) -> list[str]:
    """A TXT record's text as character-strings of at most 255 bytes."""
    return [text[i:i + 255] for i in range(0, len(text), 255)] or [""]


def port53_address() -> str:
    """A loopback address whose port 53 (UDP and TCP) is free: for programs that read
    resolv.conf, which has no port (chasquid)."""
    import random

    for _ in range(50):
        host = f"127.0.{random.randint(54, 250)}.{random.randint(2, 250)}"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
                u.bind((host, 53))
                t.bind((host, 53))
            return host
        except OSError:
            continue
    raise SystemExit("no loopback address with a free port 53 (are we root?)")


class LoopbackDns:
    """An authoritative DNS server on loopback answering the given TXT records (every other
    name: NXDOMAIN) with one TTL. Debian's dnsmasq when installed (``prefer="auto"``), else
    tests/dnsserver.py in a thread of this process (which then shares the benchmark's CPU).

    As a real authoritative server must (RFC 2308 3), a negative answer for a name in the
    records' zones (``tampu.testing.dns.zone_of``) carries the zone's SOA, with the same TTL
    as its MINIMUM, so resolvers cache it as they would on the Internet: a sender without a
    DMARC record costs one ``_dmarc`` query per TTL, not one per message. (dnsmasq answers
    those zones authoritatively for that; it refuses names outside them.)"""

    def __init__(self, txt: dict[str, str], *, ttl: int = 60, host: str = "127.0.0.1",
                 port: int = 0, prefer: str = "auto") -> None:
        self.host, self.ttl = host, ttl
        self.proc: subprocess.Popen[bytes] | None = None
        self.server: Any = None
        self._extra: list[socket.socket] = []
        dnsmasq = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq"
                                               if os.path.exists("/usr/sbin/dnsmasq") else None)
        if prefer == "dnsmasq" and dnsmasq is None:
            raise SystemExit("dnsmasq is not installed (apt-get install dnsmasq-base)")
        if prefer != "python" and dnsmasq is not None:
            self.kind = "dnsmasq"
            self.port = port or free_port(host)
            argv = [dnsmasq, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                    "--bind-interfaces", f"--listen-address={host}", f"--port={self.port}",
                    "--user=root" if os.geteuid() == 0 else f"--user={os.getlogin()}",
                    "--pid-file=", f"--local-ttl={ttl}", "--local=/#/", "--no-negcache"]
            for name, text in txt.items():  # on the command line a comma splits strings
                if "," in text or '"' in text:
                    raise ValueError(f"{text!r}: no commas or quotes for dnsmasq")
                argv.append(f"--txt-record={name}," + ",".join(txt_strings(text)))
            from tampu.testing.dns import zone_of

            zones = sorted({zone_of(name) for name in txt})
            argv += [f"--auth-server=ns.{zones[0]},{host}", f"--auth-ttl={ttl}",
                     f"--auth-soa=1,hostmaster.{zones[0]},3600,600,86400"]
            argv += [f"--auth-zone={zone}" for zone in zones]
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            self._wait_ready(next(iter(txt)))
        else:
            from tests.dnsserver import DNSServer

            self.kind = "tests/dnsserver.py"
            zone = {name: {"TXT": [" ".join(f'"{s}"' for s in txt_strings(text))]}
                    for name, text in txt.items()}
            self.server = DNSServer(zone, host=host, ttl=ttl, negative_ttl=ttl)
            if port:  # a fixed port (53): our own sockets, answered by the server's logic
                self.port = port
                self._serve_fixed(port)
            else:
                self.server.start()
                self.port = self.server.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _wait_ready(self, name: str) -> None:
        import dns.message
        import dns.query

        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                dns.query.udp(dns.message.make_query(name, "TXT"), self.host, port=self.port,
                              timeout=0.3)
                return
            except Exception:
                if self.proc is not None and self.proc.poll() is not None:
                    raise SystemExit(f"dnsmasq exited ({self.proc.returncode})") from None
                time.sleep(0.05)
        raise SystemExit(f"the DNS server on {self.address} does not answer")

    def _serve_fixed(self, port: int) -> None:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((self.host, port))
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((self.host, port))
        tcp.listen(64)
        self._extra = [udp, tcp]
        server = self.server

        def serve_udp() -> None:
            while True:
                try:
                    data, peer = udp.recvfrom(4096)
                    if not data:  # the socket was shut down by stop()
                        return
                    reply = server.answer(data, udp=True)
                    if reply is not None:
                        udp.sendto(reply, peer)
                except OSError:
                    return
                except dns.exception.DNSException:  # a damaged query: no answer, go on
                    continue

        def serve_tcp() -> None:
            while True:
                try:
                    conn, _ = tcp.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(2)
                    try:
                        head = conn.recv(2)
                        data = b""
                        while len(head) == 2 and len(data) < int.from_bytes(head, "big"):
                            chunk = conn.recv(65535)
                            if not chunk:
                                break
                            data += chunk
                        reply = server.answer(data)
                        if reply is not None:
                            conn.sendall(len(reply).to_bytes(2, "big") + reply)
                    except (OSError, ValueError):
                        pass
        for target in (serve_udp, serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        elif self._extra:
            for s in self._extra:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        elif self.server is not None:
            self.server.stop()


# ---------------------------------------------------------------------------- configuration


def write_users(root: Path, users: dict[str, str]) -> None:
    """domains/<domain>/users with each ``address: password`` (tampu's format)."""
    from tampu.users import UserRecord, hash_password, write_users_file

    by_domain: dict[str, dict[str, UserRecord]] = {}
    for address, password in users.items():
        user, _, domain = address.rpartition("@")
        by_domain.setdefault(domain, {})[user] = UserRecord(user,
                                                            hash_password(password, log_n=10))
    for domain, records in by_domain.items():
        write_users_file(root / "domains" / domain / "users", records, "tampu")


def write_certificate(certs_dir: Path, hostname: str) -> None:
    """certs/<hostname>/{fullchain,privkey}.pem (self-signed), as tampu and chasquid read."""
    import logging

    from tampu.tls import make_self_signed

    logging.getLogger("tampu.tls").setLevel(logging.ERROR)
    make_self_signed(certs_dir, hostname)


def dkim_keygen(config_dir: Path, domain: str, selector: str = "bench") -> str:
    """A DKIM key for ``domain`` made with ``tampu dkim keygen``; returns its TXT record."""
    from tampu.plugins.dkim.keys import key_path, load_key

    subprocess.run([tampu_bin(), "dkim", "keygen", domain, "--selector", selector,
                    "--config-dir", str(config_dir)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = key_path(config_dir / "domains" / domain, selector)
    return load_key(path, domain).txt_record()


def write_bench_config(root: Path, server_toml: str, *, metrics_port: int | None = None,
                       dkim: bool = True) -> str | None:
    """A configuration directory: the repository's conf.d with its ``[server]`` file replaced
    by ``server_toml`` (dedented), the local user user@example.test, the metrics listener on
    a free port and (``dkim``) a DKIM key for example.test, whose TXT record is returned."""
    (root / "conf.d").mkdir(parents=True)
    (root / "domains" / LOCAL_DOMAIN).mkdir(parents=True)
    write_users(root, {LOCAL_USER: PASSWORD})
    for src in sorted((ROOT / "conf.d").glob("*.toml")):  # the shipped plugin configuration
        if src.name != "00-server.toml":
            shutil.copy(src, root / "conf.d" / src.name)
    (root / "conf.d" / "00-server.toml").write_text(textwrap.dedent(server_toml))
    port = metrics_port or free_port()
    (root / "conf.d" / "98-bench-ports.toml").write_text(
        f'[plugins.metrics]\naddress = "127.0.0.1:{port}"\n')
    return dkim_keygen(root, LOCAL_DOMAIN) if dkim else None


def write_shipped_config(root: Path, *, hostname: str, ports: dict[str, int],
                         metrics_port: int, dns_servers: list[str],
                         server: dict[str, int | str] | None = None) -> None:
    """The repository's conf.d exactly as shipped, plus one file (99-bench.toml) changing only
    the listeners' ports, the hostname, dns_servers, the metrics port and the ``server``
    keys given (workers); a certificate in certs/<hostname>/; the user user@example.test."""
    shutil.copytree(ROOT / "conf.d", root / "conf.d")
    (root / "domains" / LOCAL_DOMAIN).mkdir(parents=True)
    write_users(root, {LOCAL_USER: PASSWORD})
    write_certificate(root / "certs", hostname)
    lines = ["# the benchmark's changes to the shipped conf.d", "[server]",
             f"hostname = {json.dumps(hostname)}", f"dns_servers = {json.dumps(dns_servers)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in (server or {}).items()]
    for name, port in ports.items():
        lines += [f"[server.listeners.{name}]", f'addresses = ["127.0.0.1:{port}"]']
    lines += ["[plugins.metrics]", f'address = "127.0.0.1:{metrics_port}"']
    (root / "conf.d" / "99-bench.toml").write_text("\n".join(lines) + "\n")


def count_files(folder: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(folder))
    except FileNotFoundError:
        return 0


def empty_folder(folder: Path) -> None:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        os.unlink(entry.path)


def wait_delivered(folders: Iterable[Path], expected: int, timeout: float,
                   settle: float = 3.0) -> int:
    """Poll (bounded) until the folders hold ``expected`` files, or nothing new arrived for
    ``settle`` seconds; returns the count."""
    folders = list(folders)
    end = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    while True:
        n = sum(count_files(f) for f in folders)
        now = time.monotonic()
        if n >= expected or now > end:
            return n
        if n != last:
            last, last_change = n, now
        elif now - last_change > settle:
            return n
        time.sleep(0.02)


def make_tmp(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# ---------------------------------------------------------------------------- SMTP client


class SmtpError(Exception):
    pass


def message_body(size: int, *, sender: str = SENDER, rcpt: str = LOCAL_USER,
                 serial: int = 0) -> bytes:
    """A message of about ``size`` bytes of payload after headers like smtp-source's
    (From, To, Date, Message-Id; payload lines of 78 x's), CRLF line ends."""
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench\r\n"
            f"Date: Tue, 1 Dec 2026 13:06:31 +0000\r\n"
            f"Message-Id: <bench.{serial}@example.org>\r\n\r\n").encode()
    line = b"X" * 78 + b"\r\n"
    return head + line * max(1, size // len(line))


def dkim_sign_body(body: bytes, domain: str, selector: str, pem: bytes) -> bytes:
    """``body`` with a DKIM-Signature by ``pem`` (tampu's signer, relaxed/relaxed)."""
    from tampu.plugins.dkim.keys import parse_key
    from tampu.plugins.dkim.sign import sign

    key = parse_key(pem, Path(f"dkim:{selector}.pem"), domain, selector)
    [(name, value)] = sign(body, [key])
    return f"{name}: {value}\r\n".encode() + body


@dataclass
class SmtpClient:
    """One SMTP connection. ``pipelining``: MAIL/RCPT/DATA in one write when offered (False:
    one command at a time, as smtp-source does)."""

    host: str
    port: int
    helo: str = "bench.test"
    pipelining: bool = True
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    offered: set[str] = field(default_factory=set)

    async def reply(self) -> tuple[int, bytes]:
        assert self.reader is not None
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    async def command(self, line: bytes, expect: int) -> bytes:
        assert self.writer is not None
        self.writer.write(line)
        code, text = await self.reply()
        if code != expect:
            raise SmtpError(f"{line.split()[0].decode()}: {text!r}")
        return text

    async def ehlo(self) -> None:
        text = await self.command(f"EHLO {self.helo}\r\n".encode(), 250)
        self.offered = {ln[4:].split(b" ")[0].strip().upper().decode()
                        for ln in text.splitlines()[1:]}

    async def connect(self, *, starttls: bool = False, login: tuple[str, str] | None = None
                      ) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        code, text = await self.reply()
        if code != 220:
            raise SmtpError(f"greeting {text!r}")
        await self.ehlo()
        if starttls:
            await self.command(b"STARTTLS\r\n", 220)
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # self-signed
            await self.writer.start_tls(ctx)
            await self.ehlo()
        if login is not None:
            token = base64.b64encode(f"\0{login[0]}\0{login[1]}".encode()).decode()
            await self.command(f"AUTH PLAIN {token}\r\n".encode(), 235)

    async def send(self, sender: str, rcpt: str, body: bytes) -> float:
        """One transaction; returns the seconds from the end of the data to the final 250."""
        assert self.writer is not None
        cmds = [f"MAIL FROM:<{sender}>\r\n".encode(), f"RCPT TO:<{rcpt}>\r\n".encode(),
                b"DATA\r\n"]
        if self.pipelining and "PIPELINING" in self.offered:
            self.writer.write(b"".join(cmds))
            replies = [await self.reply() for _ in cmds]
        else:
            replies = []
            for c in cmds:
                self.writer.write(c)
                replies.append(await self.reply())
        if [r[0] for r in replies] != [250, 250, 354]:
            raise SmtpError(f"replies {[r[1] for r in replies]!r}")
        self.writer.write(body)
        start = time.perf_counter()
        self.writer.write(b".\r\n")
        code, text = await self.reply()
        latency = time.perf_counter() - start
        if code != 250:
            raise SmtpError(f"final reply {text!r}")
        return latency

    async def rset(self) -> None:
        await self.command(b"RSET\r\n", 250)

    async def quit(self, wait: bool = True) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(b"QUIT\r\n")
            if wait:
                await self.reply()
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of ``values`` (NaN when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def log_tail(path: Path, pattern: str = r" (ERROR|CRITICAL) ", limit: int = 3) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [ln for ln in lines if re.search(pattern, ln)][:limit]


def tee(out: IO[str] | None, text: str = "") -> None:
    print(text, flush=True)
    if out is not None:
        out.write(text + "\n")
        out.flush()
