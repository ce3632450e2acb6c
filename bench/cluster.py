#!/usr/bin/env python3
"""Cluster benchmark: the queue in PostgreSQL against the filesystem store, in one run.

Scenarios, each with fresh data (fsync on everywhere, full default pipeline: SPF against a
DNS server on loopback, local delivery into a Maildir):

* ``fs-1``: one node, filesystem store (the embedded default: the baseline);
* ``pg-1``: one node, queue and state in PostgreSQL;
* ``pg-3``: three nodes (127.0.0.2/3/4) sharing one PostgreSQL, clients spread over them;
* ``takeover``: node A accepts ``--takeover`` items for a remote MX that accepts connections
  and never answers (so every item is in flight on A, under A's lease: stuck at the MX or
  waiting for a delivery slot), A is killed with SIGKILL, node B (whose MX works) delivers
  them: the time from the kill to the first and the last delivery.

For each load scenario: accepted messages/s and p50/p99 latency of the ``250`` (from
bench/accept.py's client), and CPU per message of the tampu processes and of PostgreSQL
(utime+stime from /proc of each process tree, from start of load until the queue drained).

    python bench/cluster.py                       # 20 clients x 50 msgs, takeover of 1000
    python bench/cluster.py -c 30 -m 100 --only pg-1 --only fs-1
    python bench/cluster.py --pg-setting synchronous_commit=off   # what durability costs

Bounded: every wait has a deadline (--timeout per scenario).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.pgserver import PostgresServer  # noqa: E402 - after sys.path

NODE_HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
MX_HOST = "127.0.0.5"
TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- helpers
# Self-contained (bench/_common.py and accept.py change with the other benchmarks).


def wait_port(host: str, port: int, timeout: float = 20) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def write_bench_config(root: Path, server_toml: str) -> None:
    """The repository's conf.d with its [server] file replaced, and user@example.test."""
    import textwrap

    from tampu.users import UserRecord, hash_password, write_users_file

    (root / "conf.d").mkdir(parents=True)
    (root / "domains" / "example.test").mkdir(parents=True)
    write_users_file(root / "domains" / "example.test" / "users",
                     {"user": UserRecord("user", hash_password("benchpass", log_n=10))},
                     "tampu")
    for src in sorted((ROOT / "conf.d").glob("*.toml")):
        if src.name != "00-server.toml":
            shutil.copy(src, root / "conf.d" / src.name)
    (root / "conf.d" / "00-server.toml").write_text(textwrap.dedent(server_toml))


class Dnsmasq:
    """Debian's dnsmasq answering TXT records on a loopback port (a C server: the DNS load
    does not eat the CPU that tampu is measured on)."""

    def __init__(self, records: dict[str, str]) -> None:
        self.port = free_port("127.0.0.1")
        argv = [shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground",
                "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
                f"--port={self.port}", "--user=root", "--pid-file="]
        argv += [f"--txt-record={name},{text}" for name, text in records.items()]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def _send(host: str, port: int, body: bytes, rcpt: str) -> float:
    """One message over a new connection (PIPELINING); seconds from the final dot to 250."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if await _reply(reader) != 220:
            raise RuntimeError("no greeting")
        writer.write(b"EHLO bench.test\r\n")
        await _reply(reader)
        writer.write(b"MAIL FROM:<a@example.org>\r\n" + f"RCPT TO:<{rcpt}>\r\n".encode()
                     + b"DATA\r\n")
        codes = [await _reply(reader) for _ in range(3)]
        if codes != [250, 250, 354]:
            raise RuntimeError(f"replies {codes}")
        writer.write(body)
        start = time.perf_counter()
        writer.write(b".\r\n")
        code = await _reply(reader)
        latency = time.perf_counter() - start
        if code != 250:
            raise RuntimeError(f"final reply {code}")
        writer.write(b"QUIT\r\n")
        return latency
    finally:
        writer.close()


async def run_load(host: str, port: int, clients: int, messages: int, size: int, rcpt: str,
                   limit_s: float) -> dict[str, float]:
    """``clients`` concurrent clients each sending ``messages`` messages of ``size`` bytes."""
    head = (b"From: a@example.org\r\nTo: user@example.test\r\nSubject: bench\r\n"
            b"Message-ID: <bench@example.org>\r\n\r\n")
    body = head + (b"x" * 76 + b"\r\n") * max(
        0, (size - len(head)) // 78)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + limit_s

    async def client() -> None:
        for _ in range(messages):
            if time.monotonic() > deadline:
                return
            try:
                latencies.append(await _send(host, port, body + b"\r\n", rcpt))
            except Exception as exc:  # counted and reported, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}")

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    if errors:
        print(f"  first errors: {errors[:3]}", file=sys.stderr)
    return {"messages": len(lat), "errors": len(errors), "seconds": elapsed,
            "msgs_per_s": len(lat) / elapsed if elapsed else 0.0,
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat
            else float("nan")}


# ---------------------------------------------------------------------------- CPU


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, utime+stime, cutime+cstime) in seconds, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, \
        (int(fields[13]) + int(fields[14])) / TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants, plus the reaped children's."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None:
                stats[int(entry)] = found
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _, _) in stats.items():
        children[ppid].append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            _, own, reaped = stats[pid]
            total += own + reaped
            todo.extend(children.get(pid, ()))
    return total


def postmaster_pid(pg: PostgresServer) -> int:
    assert pg.dir is not None
    return int((pg.dir / "data" / "postmaster.pid").read_text().split()[0])


# ---------------------------------------------------------------------------- nodes


def free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, root: Path, host: str, name: str, store: str, dns_port: int,
                 dsn: str | None, extra: str = "", *, mx_port: int = 0,
                 lease: float = 30.0) -> None:
        self.root, self.host, self.name = root, host, name
        self.port = free_port(host)
        self.dsn = dsn
        write_bench_config(root, f"""\
            [server]
            hostname = "{name}.bench.test"
            node = "{name}"
            self_signed_cert = true
            max_queue_items = 1000000
            max_connections = 5000
            queue_store = "{store}"
            dns_servers = ["127.0.0.1:{dns_port}"]
            dns_timeout = 2
            log_level = "warning"
            retry_schedule = [600.0]
            [server.listeners.smtp]
            kind = "smtp"
            addresses = ["{host}:{self.port}"]
            """)
        tables = "[plugins.metrics]\nenabled = false\n"  # three nodes on one host: one port
        tables += "[plugins.relay]\nenabled = true\ntrusted_networks = [\"127.0.0.1/32\"]\n"
        if mx_port:
            tables += f"[plugins.delivery_smtp]\nenabled = true\nport = {mx_port}\n" \
                "connect_timeout = 2\n"
        if store == "postgres":
            tables += (f'[plugins.queue_postgres]\nenabled = true\ndsn = "$env:TAMPU_PG_DSN"\n'
                       f"lease_seconds = {lease}\npoll_interval = 0.5\n")
        (root / "conf.d" / "90-bench.toml").write_text(tables)
        (root / "conf.d" / "91-bench-extra.toml").write_text(extra)  # may repeat a table
        self.env = {**os.environ, **({"TAMPU_PG_DSN": dsn} if dsn else {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        tampu = shutil.which("tampu") or str(Path(sys.executable).parent / "tampu")
        with open(self.root / "serve.log", "wb") as log:
            self.proc = subprocess.Popen([tampu, "serve", "--config-dir", str(self.root)],
                                         stdout=subprocess.DEVNULL, stderr=log, env=self.env)

    def wait(self) -> None:
        try:
            wait_port(self.host, self.port, 30)
        except SystemExit:
            print((self.root / "serve.log").read_text(), file=sys.stderr)
            raise

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc is not None else 0.0

    def delivered(self) -> int:
        box = self.root / "data" / "mail" / "example.test" / "user" / "new"
        try:
            return len(os.listdir(box))
        except FileNotFoundError:
            return 0

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def migrate(node: Node) -> None:
    tampu = shutil.which("tampu") or str(Path(sys.executable).parent / "tampu")
    done = subprocess.run([tampu, "db", "migrate", "--config-dir", str(node.root)],
                          capture_output=True, text=True, env=node.env, timeout=60)
    if done.returncode:
        raise SystemExit(f"tampu db migrate failed: {done.stderr}")


# ---------------------------------------------------------------------------- load


async def spread_load(nodes: list[Node], clients: int, messages: int, size: int,
                      limit: float) -> dict[str, float]:
    """``clients`` split over ``nodes``; the figures of all of them together."""
    start = time.perf_counter()
    shares = [clients // len(nodes) + (i < clients % len(nodes)) for i in range(len(nodes))]
    results = await asyncio.gather(*(run_load(n.host, n.port, share, messages, size,
                                              "user@example.test", limit)
                                     for n, share in zip(nodes, shares, strict=True) if share))
    elapsed = time.perf_counter() - start
    total = sum(r["messages"] for r in results)
    return {"messages": total, "errors": sum(r["errors"] for r in results),
            "seconds": elapsed, "msgs_per_s": total / elapsed if elapsed else 0.0,
            "p50_ms": max(r["p50_ms"] for r in results),
            "p99_ms": max(r["p99_ms"] for r in results)}


def run_scenario(name: str, count: int, store: str, args: argparse.Namespace, dns_port: int,
                 pg: PostgresServer | None, workdir: Path) -> dict[str, Any]:
    dsn = pg.create_database(name.replace("-", "_")) if pg is not None and store == "postgres" \
        else None
    nodes = [Node(workdir / f"{name}-{i}", NODE_HOSTS[i] if count > 1 else "127.0.0.1",
                  f"n{i}", store, dns_port, dsn, args.extra) for i in range(count)]
    if dsn:
        migrate(nodes[0])
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            node.wait()
        time.sleep(0.5)  # start-up work (recovery, first heartbeats) out of the measurement
        pg_before = tree_cpu(postmaster_pid(pg)) if pg is not None else 0.0
        cpu_before = sum(n.cpu() for n in nodes)
        started = time.perf_counter()
        res = asyncio.run(spread_load(nodes, args.clients, args.messages, args.size,
                                      args.timeout))
        deadline = time.monotonic() + args.timeout
        while sum(n.delivered() for n in nodes) < res["messages"]:
            if time.monotonic() > deadline:
                print(f"  {name}: queue not drained in {args.timeout:.0f}s", file=sys.stderr)
                break
            time.sleep(0.1)
        res["drain_s"] = time.perf_counter() - started
        res["tampu_cpu_ms"] = 1000 * (sum(n.cpu() for n in nodes) - cpu_before) / max(
            1, res["messages"])
        res["pg_cpu_ms"] = 1000 * (tree_cpu(postmaster_pid(pg)) - pg_before) / max(
            1, res["messages"]) if dsn and pg is not None else 0.0
        res["delivered"] = sum(n.delivered() for n in nodes)
        return res
    finally:
        for node in nodes:
            node.stop()


# ---------------------------------------------------------------------------- takeover


class CountingSink:
    """An aiosmtpd handler that counts messages and notes when the first and last came."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.count += 1
            now = time.monotonic()
            self.first = self.first or now
            self.last = now
        return "250 2.0.0 stored"


class Tarpit:
    """A server that accepts TCP connections and never says a word (an MX that hangs)."""

    def __init__(self, host: str) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(4096)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[Any] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def stop(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def run_takeover(args: argparse.Namespace, pg: PostgresServer, workdir: Path
                 ) -> dict[str, float]:
    from aiosmtpd.controller import Controller

    from tests.dnsserver import DNSServer

    dsn = pg.create_database("takeover")
    sink = CountingSink()
    mx_port = free_port(MX_HOST)
    controller = Controller(sink, hostname=MX_HOST, port=mx_port, ready_timeout=5)
    controller.start()
    tarpit = Tarpit(MX_HOST)  # node A's MX: accepts connections and never answers
    zone = {"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": [MX_HOST]},
            "example.org": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"']}}
    with DNSServer(zone) as dns:
        a = Node(workdir / "take-a", NODE_HOSTS[0], "a", "postgres", dns.port, dsn,
                 mx_port=tarpit.port, lease=args.lease,
                 extra="[plugins.delivery_smtp]\nconnect_timeout = 600\n")
        b = Node(workdir / "take-b", NODE_HOSTS[1], "b", "postgres", dns.port, dsn,
                 mx_port=mx_port, lease=args.lease)
        migrate(a)
        try:
            a.start()
            a.wait()
            n = args.takeover
            res = asyncio.run(run_load(a.host, a.port, 20, -(-n // 20), args.size,
                                       "someone@remote.test", args.timeout))
            accepted = int(res["messages"])
            # every item in flight on a (stuck at its MX, or waiting for a delivery slot),
            # under a's leases
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                waiting = int(pg.psql("SELECT count(*) FROM tampu_queue WHERE node = 'a' "
                                      "AND lease_until > tampu_now()", "takeover").strip() or 0)
                if waiting >= accepted:
                    break
                time.sleep(0.2)
            b.start()
            b.wait()
            time.sleep(1.0)
            killed = time.monotonic()
            a.stop(signal.SIGKILL)
            deadline = killed + args.lease + args.timeout
            while sink.count < accepted and time.monotonic() < deadline:
                time.sleep(0.05)
            return {"items": accepted, "waiting": waiting, "delivered": sink.count,
                    "first_s": (sink.first - killed) if sink.first else float("nan"),
                    "all_s": (sink.last - killed) if sink.count >= accepted else float("nan"),
                    "lease_s": args.lease}
        finally:
            a.stop()
            b.stop()
            controller.stop()
            tarpit.stop()


# ---------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--clients", type=int, default=20)
    p.add_argument("-m", "--messages", type=int, default=50, help="messages per client")
    p.add_argument("--size", type=int, default=2000, help="message size in bytes")
    p.add_argument("--takeover", type=int, default=1000, help="items of the dead node")
    p.add_argument("--lease", type=float, default=10.0, help="lease_seconds (takeover)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--only", action="append", choices=["fs-1", "pg-1", "pg-3", "takeover"],
                   help="run only these scenarios (repeatable)")
    p.add_argument("--extra", default="", help="TOML added to every node's conf.d (e.g. "
                   "'[plugins.queue_postgres]\\nbatch_puts = false')")
    p.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a PostgreSQL setting for the server (repeatable)")
    args = p.parse_args()
    wanted = args.only or ["fs-1", "pg-1", "pg-3", "takeover"]
    workdir = Path(tempfile.mkdtemp(prefix="tampu-bench-cluster-"))
    dns = Dnsmasq({"example.org": "v=spf1 ip4:127.0.0.0/8 -all"}) \
        if shutil.which("dnsmasq") or os.path.exists("/usr/sbin/dnsmasq") else None
    if dns is None:
        from tests.dnsserver import DNSServer

        dns = DNSServer({"example.org": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"']}})
        dns.start()
    settings = dict(s.split("=", 1) for s in args.pg_setting)
    pg = PostgresServer(settings=settings)
    pg.start()
    version = pg.psql("SHOW server_version").strip()
    sync = pg.psql("SHOW synchronous_commit").strip()
    print(f"tampu cluster benchmark: {args.clients} clients x {args.messages} msgs of "
          f"{args.size} B, new connection each; fsync on; PostgreSQL {version} "
          f"(synchronous_commit {sync}); {os.cpu_count()} CPUs")
    try:
        rows = {}
        for name, count, store in (("fs-1", 1, "filesystem"), ("pg-1", 1, "postgres"),
                                   ("pg-3", 3, "postgres")):
            if name in wanted:
                rows[name] = r = run_scenario(name, count, store, args, dns.port, pg, workdir)
                print(f"  {name:<5} {r['msgs_per_s']:6.0f} msgs/s  p50 {r['p50_ms']:6.1f} ms  "
                      f"p99 {r['p99_ms']:6.1f} ms  tampu CPU {r['tampu_cpu_ms']:5.2f} ms/msg  "
                      f"PostgreSQL CPU {r['pg_cpu_ms']:5.2f} ms/msg  "
                      f"({r['messages']:.0f} accepted, {r['errors']:.0f} errors, "
                      f"{r['delivered']} delivered, drained in {r['drain_s']:.1f}s)", flush=True)
        if "fs-1" in rows and "pg-1" in rows and rows["fs-1"]["msgs_per_s"]:
            print(f"  pg-1 / fs-1 throughput: "
                  f"{100 * rows['pg-1']['msgs_per_s'] / rows['fs-1']['msgs_per_s']:.0f}%")
        if "takeover" in wanted:
            t = run_takeover(args, pg, workdir)
            print(f"  takeover: {t['items']:.0f} items of a killed node (lease "
                  f"{t['lease_s']:.0f}s): first delivered by the survivor after "
                  f"{t['first_s']:.1f}s, " + (f"all {t['delivered']:.0f} after {t['all_s']:.1f}s"
                                               if t["delivered"] >= t["items"] else
                                               f"only {t['delivered']:.0f} within the timeout"))
    finally:
        pg.stop()
        dns.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
