#!/usr/bin/env python3
"""Reception benchmark: N concurrent clients each send M messages to a local user over loopback.

Starts its own `tampu serve` (subprocess, fsync on, full default pipeline: SPF against a DNS
server on loopback, local delivery into a Maildir) unless --target HOST:PORT is given, then
prints messages/s and p50/p99 latency of the final "250" (from the end of DATA to the reply).

    python bench/accept.py                  # 20 clients x 100 messages, new connection each
    python bench/accept.py -c 50 -m 200 --size 10000 --workers 2
    python bench/accept.py --target 127.0.0.1:2601   # any SMTP server (e.g. chasquid)

The client is a minimal asyncio SMTP client (pipelining MAIL/RCPT/DATA when offered) so that
the load generator costs little of the 2 cores. Bounded: stops after N*M messages or --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import free_port, wait_port, write_bench_config  # noqa: E402 - after sys.path


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def send_one(host: str, port: int, body: bytes, rcpt: str, reuse: tuple | None = None
                   ) -> tuple[float, tuple | None]:
    if reuse is None:
        reader, writer = await asyncio.open_connection(host, port)
        code, _ = await read_reply(reader)
        if code != 220:
            raise RuntimeError(f"greeting {code}")
        writer.write(b"EHLO bench.test\r\n")
        code, ehlo = await read_reply(reader)
        pipelining = b"PIPELINING" in ehlo
    else:
        reader, writer, pipelining = reuse
        writer.write(b"RSET\r\n")
        await read_reply(reader)
    cmds = [b"MAIL FROM:<a@example.org>\r\n", f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n"]
    if pipelining:
        writer.write(b"".join(cmds))
        codes = [(await read_reply(reader))[0] for _ in cmds]
    else:
        codes = []
        for c in cmds:
            writer.write(c)
            codes.append((await read_reply(reader))[0])
    if codes != [250, 250, 354]:
        raise RuntimeError(f"replies {codes}")
    writer.write(body)
    start = time.perf_counter()
    writer.write(b".\r\n")
    code, text = await read_reply(reader)
    latency = time.perf_counter() - start
    if code != 250:
        raise RuntimeError(f"final reply {text!r}")
    return latency, (reader, writer, pipelining)


async def client(host: str, port: int, count: int, body: bytes, rcpt: str, reuse: bool,
                 latencies: list[float], errors: list[str], deadline: float) -> None:
    conn = None
    for _ in range(count):
        if time.monotonic() > deadline:
            return
        try:
            lat, conn = await send_one(host, port, body, rcpt, conn if reuse else None)
            latencies.append(lat)
            if not reuse:
                _, writer, _ = conn  # type: ignore[misc]
                writer.write(b"QUIT\r\n")
                writer.close()
                conn = None
        except Exception as exc:  # counted and reported, the run goes on
            errors.append(f"{type(exc).__name__}: {exc}")
            conn = None


def make_body(size: int) -> bytes:
    head = (b"From: a@example.org\r\nTo: user@example.test\r\nSubject: bench\r\n"
            b"Message-ID: <bench@example.org>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    n = max(0, size - len(head)) // len(line)
    return head + line * n


async def run_load(host: str, port: int, clients: int, messages: int, size: int,
                   rcpt: str, reuse: bool, limit_s: float) -> dict[str, float]:
    body = make_body(size)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + limit_s
    start = time.perf_counter()
    await asyncio.gather(*(client(host, port, messages, body, rcpt, reuse, latencies, errors,
                                  deadline) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    result = {
        "messages": len(lat), "errors": len(errors), "seconds": elapsed,
        "msgs_per_s": len(lat) / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
    }
    if errors:
        print(f"  first errors: {errors[:3]}", file=sys.stderr)
    return result


def write_config(root: Path, port: int, dns_port: int, workers: int, fsync_note: str,
                 disable: list[str] | None = None) -> None:
    write_bench_config(root, f"""\
        # benchmark configuration ({fsync_note})
        [server]
        hostname = "bench.test"
        self_signed_cert = true
        max_queue_items = 1000000
        max_connections = 5000
        workers = {workers}
        dns_servers = ["127.0.0.1:{dns_port}"]
        dns_timeout = 2
        log_level = "warning"
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{port}"]
        """)
    if disable:  # for finding where the time goes: the pipeline without some plugins
        (root / "conf.d" / "99-bench-disable.toml").write_text(
            "".join(f"[plugins.{name}]\nenabled = false\n" for name in disable))


class Dnsmasq:
    """Debian's dnsmasq answering the SPF record on a loopback port (a C server, so the load
    of the benchmark's DNS does not eat the CPU that tampu is measured on)."""

    def __init__(self, records: dict[str, str]) -> None:
        self.port = free_port()
        argv = [shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground",
                "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
                f"--port={self.port}", "--user=root", "--pid-file="]
        argv += [f"--txt-record={name},{text}" for name, text in records.items()]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--clients", type=int, default=20)
    p.add_argument("-m", "--messages", type=int, default=100, help="messages per client")
    p.add_argument("--size", type=int, default=2000, help="message size in bytes")
    p.add_argument("--reuse", action="store_true", help="one connection per client (RSET)")
    p.add_argument("--workers", type=int, default=1, help="tampu reception processes")
    p.add_argument("--target", help="HOST:PORT of a running server instead of starting tampu")
    p.add_argument("--rcpt", default="user@example.test")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--dns", choices=["auto", "dnsmasq", "python"], default="auto",
                   help="DNS server on loopback for SPF: Debian's dnsmasq (auto: if installed) "
                   "or tests/dnsserver.py")
    p.add_argument("--disable", action="append", default=[], metavar="PLUGIN",
                   help="disable a default plugin (repeatable), to see what it costs")
    p.add_argument("--keep", action="store_true", help="keep tampu running (prints its port)")
    args = p.parse_args()

    proc = None
    tmp = None
    dns: Any = None
    if args.target:
        host, _, port_s = args.target.rpartition(":")
        port = int(port_s)
    else:
        from tests.dnsserver import DNSServer

        spf = "v=spf1 ip4:127.0.0.1 -all"
        have_dnsmasq = bool(shutil.which("dnsmasq")) or os.path.exists("/usr/sbin/dnsmasq")
        if args.dns == "dnsmasq" or (args.dns == "auto" and have_dnsmasq):
            dns = Dnsmasq({"example.org": spf})
        else:
            dns = DNSServer({"example.org": {"TXT": [f'"{spf}"']}})
            dns.start()
        tmp = Path(tempfile.mkdtemp(prefix="tampu-bench-"))
        host, port = "127.0.0.1", free_port()
        write_config(tmp, port, dns.port, args.workers, "fsync on", args.disable)
        tampu = shutil.which("tampu") or str(Path(sys.executable).parent / "tampu")
        proc = subprocess.Popen([tampu, "serve", "--config-dir", str(tmp)],
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "w"))
        wait_port("127.0.0.1", port)
    try:
        if args.keep:
            pid = proc.pid if proc else '-'
            print(f"tampu listening on 127.0.0.1:{port} (config {tmp}) pid {pid}"
                  "; Ctrl-C or SIGTERM to stop", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            signal.pause()
        res = asyncio.run(run_load(host, port, args.clients, args.messages, args.size,
                                   args.rcpt, args.reuse, args.timeout))
        what = args.target or f"tampu (workers={args.workers}, fsync on, delivery to Maildir)"
        print(f"{what}: {args.clients} clients x {args.messages} msgs of {args.size} B, "
              f"{'reused' if args.reuse else 'new'} connections")
        print(f"  {res['messages']:.0f} accepted, {res['errors']:.0f} errors in "
              f"{res['seconds']:.2f}s: {res['msgs_per_s']:.0f} msgs/s, "
              f"p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if dns is not None:
            dns.stop()
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
