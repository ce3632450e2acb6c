#!/usr/bin/env python3
"""The side-by-side pass of issue 12: chasquid and tampu under the same load, interleaved.

    python bench/compare.py                       # 5 rounds, 20 sessions, 2,000 msgs of 2 KB
    python bench/compare.py --rounds 3 --messages 1000 --output bench/results/x.txt
    python bench/compare.py --systems chasquid,tampu-w2 --fsync-messages 0
    python bench/compare.py --idle 10000          # only: RSS of 10,000 idle connections

Systems (``--systems``, in this order in every round):

* ``chasquid``: Debian's chasquid delivering through maildrop into a Maildir, in a private
  mount namespace whose /etc/resolv.conf names the loopback DNS server (on port 53 of a
  127.0.x.y address), so its SPF check of the MAIL FROM domain passes for real;
* ``tampu-wN``: tampu with the repository's conf.d as shipped, only ports, hostname,
  dns_servers and a certificate changed (conf.d/99-bench.toml in its directory), and
  ``workers = N``; ``tampu-wN-ttl0``: the same against a DNS server answering with TTL 0, so
  every MAIL FROM costs an SPF query.

Load: Postfix's smtp-source, ``--sessions`` sessions of which ``--probe-sessions`` are this
script's latency probe (the same dialogue as smtp-source: EHLO, then MAIL, RCPT, DATA one at a
time, a new connection per message, QUIT), 2 KB of payload per message. smtp-source does not
report latency; the probe times the final ``250`` (end of data to reply) of its messages.

Per round and as medians it prints msgs/s (messages accepted / seconds until smtp-source is
done), the ratio to chasquid in the same round, server CPU milliseconds per message (utime +
stime of the server's process tree from /proc, exited children included through cutime +
cstime, sampled before the load and after the last message is in the Maildir, so delivery is
counted), and p50/p99 of the probe's final 250s. Then VmRSS (and Pss) of each server process
after the rounds, and fsyncs per message from ``strace -f -c`` attached to the server tree
for a short extra run (``--fsync-messages``; strace slows the server down a lot, so that run's
speed means nothing).

Bounded: each load stops after --timeout seconds, the whole pass after --max-minutes;
everything started here (dnsmasq, servers, smtp-source, strace) is stopped by PID and the
temporary directory removed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402 - after sys.path
    LOCAL_USER,
    PASSWORD,
    ROOT,
    SENDER,
    SENDER_DOMAIN,
    SPF_RECORD,
    FsyncCounter,
    LoopbackDns,
    ProcMemory,
    SmtpClient,
    empty_folder,
    free_port,
    make_tmp,
    message_body,
    mib,
    percentile,
    port53_address,
    raise_fd_limit,
    start,
    stop,
    tampu_bin,
    tee,
    tree_cpu_seconds,
    tree_memory,
    wait_delivered,
    wait_port,
    write_certificate,
    write_shipped_config,
)

HOSTNAME = "bench.test"
NOISE_NOTE = ("The machine is shared with other engineers' work: msgs/s and latency move with "
              "their load; server CPU per message is the steadier figure.")


@dataclass
class System:
    name: str
    label: str
    proc: subprocess.Popen[bytes]
    port: int
    maildirs: list[Path]
    log: Path
    dns: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Run:
    system: str
    accepted: int
    delivered: int
    failed: int
    seconds: float
    cpu_s: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.accepted if self.accepted else float("nan")


# ---------------------------------------------------------------------------- the servers


def chasquid_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "chasquid"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or "?"


def start_chasquid(base: Path, dns: LoopbackDns) -> System:
    """chasquid with maildrop into base/Maildir, resolv.conf -> the loopback DNS server."""
    if dns.port != 53:
        raise SystemExit("chasquid needs the DNS server on port 53 (resolv.conf has no port)")
    d = base / "chasquid"
    for sub in ("domains/example.test", "data", "Maildir/new", "Maildir/cur", "Maildir/tmp"):
        (d / sub).mkdir(parents=True)
    write_certificate(d / "certs", HOSTNAME)
    mailfilter = d / "mailfilter"
    mailfilter.write_text(f'to "{d}/Maildir/"\n')
    mailfilter.chmod(0o600)
    port = free_port()
    args = "".join(f'mail_delivery_agent_args: "{a}"\n'
                   for a in ("-f", "%from%", str(mailfilter)))
    (d / "chasquid.conf").write_text(
        f'hostname: "{HOSTNAME}"\n'
        f'smtp_address: "127.0.0.1:{port}"\n'
        f'submission_address: "127.0.0.1:{free_port()}"\n'
        f'submission_over_tls_address: "127.0.0.1:{free_port()}"\n'
        f'monitoring_address: "127.0.0.1:{free_port()}"\n'
        f'mail_delivery_agent_bin: "{shutil.which("maildrop") or "/usr/bin/maildrop"}"\n'
        f"{args}"
        f'data_dir: "{d}/data"\nmail_log_path: "{d}/mail.log"\n')
    subprocess.run(["chasquid-util", f"--configdir={d}", "user-add", LOCAL_USER,
                    f"--password={PASSWORD}"], check=True, stdout=subprocess.DEVNULL)
    (d / "resolv.conf").write_text(f"nameserver {dns.host}\n")
    log = d / "chasquid.log"
    # unshare execs sh, which execs chasquid: the PID is chasquid's; the bind mount lives
    # only in the new (private) mount namespace
    proc = start(["unshare", "-m", "sh", "-c",
                  f'mount --bind "{d}/resolv.conf" /etc/resolv.conf && '
                  f'exec chasquid -config_dir "{d}" -logfile "{log}"'], d / "stdout.log")
    wait_port("127.0.0.1", port, proc=proc)
    return System("chasquid", f"chasquid {chasquid_version()} + maildrop", proc, port,
                  [d / "Maildir" / "new"], log, dns.address)


def start_tampu(base: Path, name: str, workers: int, dns: LoopbackDns,
                max_connections: int | None) -> System:
    d = base / name
    port = free_port()
    server: dict[str, int | str] = {"workers": workers}
    if max_connections:
        server["max_connections"] = max_connections
    write_shipped_config(d, hostname=HOSTNAME, metrics_port=free_port(),
                         ports={"smtp": port, "submission": free_port(),
                                "submissions": free_port()},
                         dns_servers=[dns.address], server=server)
    log = d / "serve.log"
    proc = start([tampu_bin(), "serve", "--config-dir", str(d)], log)
    wait_port("127.0.0.1", port, timeout=60, proc=proc)
    label = f"tampu workers={workers}" + (", SPF TTL 0" if dns.ttl == 0 else "")
    return System(name, label, proc, port,
                  [d / "data" / "mail" / "example.test" / "user" / "new"], log, dns.address)


def spf_seen(system: System) -> str:
    """The SPF verdict a delivered message carries (a check that the SPF pass is real)."""
    for folder in system.maildirs:
        try:
            path = next(os.scandir(folder)).path
        except (StopIteration, FileNotFoundError):
            continue
        head = Path(path).read_bytes().split(b"\n\n", 1)[0].decode("utf-8", "replace")
        m = re.search(r"^Received-SPF: *(\S+)", head, re.M | re.I)
        return m.group(1).lower() if m else "no Received-SPF header"
    return "no message delivered"


# ---------------------------------------------------------------------------- one load


async def probe(port: int, size: int, done: asyncio.Event, deadline: float,
                latencies: list[float], errors: list[str], counter: list[int]) -> None:
    """One session sending messages as smtp-source does, timing each final 250."""
    serial = 0
    while not done.is_set() and time.monotonic() < deadline and serial < 1_000_000:
        serial += 1
        client = SmtpClient("127.0.0.1", port, helo="probe.test", pipelining=False)
        try:
            await asyncio.wait_for(client.connect(), 30)
            lat = await asyncio.wait_for(client.send(SENDER, LOCAL_USER,
                                                     message_body(size, serial=serial)), 60)
            latencies.append(lat)
            counter[0] += 1
            await asyncio.wait_for(client.quit(), 10)
        except Exception as exc:  # counted; the run goes on
            errors.append(f"probe: {type(exc).__name__}: {exc}")
            client.close()
            await asyncio.sleep(0.05)


SOURCE_FAILURE = re.compile(r"rejected|while sending|connect|timeout|fatal", re.I)


async def load(system: System, *, sessions: int, messages: int, size: int, probes: int,
               limit_s: float) -> Run:
    for folder in system.maildirs:
        empty_folder(folder)
    smtp_source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    probes = min(probes, sessions - 1)
    latencies: list[float] = []
    errors: list[str] = []
    probe_ok = [0]
    done = asyncio.Event()
    deadline = time.monotonic() + limit_s
    cpu0 = tree_cpu_seconds(system.pid)
    t0 = time.perf_counter()
    src = await asyncio.create_subprocess_exec(
        smtp_source, "-s", str(sessions - probes), "-m", str(messages), "-l", str(size),
        "-f", SENDER, "-t", LOCAL_USER, f"127.0.0.1:{system.port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    tasks = [asyncio.create_task(probe(system.port, size, done, deadline, latencies, errors,
                                       probe_ok)) for _ in range(probes)]
    try:
        _, err = await asyncio.wait_for(src.communicate(), limit_s)
    except TimeoutError:
        src.kill()  # ours, by PID
        _, err = await src.communicate()
        errors.append(f"smtp-source stopped after {limit_s:.0f}s")
    seconds = time.perf_counter() - t0
    done.set()
    await asyncio.gather(*tasks)
    failures = [ln for ln in err.decode(errors="replace").splitlines()
                if SOURCE_FAILURE.search(ln)]
    errors += [f"smtp-source: {ln}" for ln in failures]
    accepted = messages - len(failures) + probe_ok[0]
    delivered = wait_delivered(system.maildirs, accepted, timeout=max(30.0, limit_s / 2))
    cpu_s = tree_cpu_seconds(system.pid) - cpu0
    return Run(system.name, accepted, delivered, len(errors), seconds, cpu_s, latencies,
               errors)


# ---------------------------------------------------------------------------- idle connections


async def hold_idle(pid: int, port: int, count: int, limit_s: float
                    ) -> tuple[int, list[ProcMemory], int]:
    """Open ``count`` connections that read the greeting and then stay silent; returns how
    many were open, the server tree's memory with them open, and how many the server had
    closed by then."""
    sem = asyncio.Semaphore(200)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    deadline = time.monotonic() + limit_s

    async def one() -> None:
        if time.monotonic() > deadline:
            return
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 20)
            except (OSError, TimeoutError):
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 20)
            except (OSError, TimeoutError):
                line = b""
            if line.startswith(b"220"):
                conns.append((reader, writer))
            else:
                writer.close()
    try:
        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(1.0)  # let the server settle its sessions
        mem = tree_memory(pid)
        closed = sum(r.at_eof() for r, _ in conns)
        return len(conns), mem, closed
    finally:
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.5)


def idle_pass(systems: list[System], count: int, out: IO[str] | None) -> None:
    tee(out, f"## {count} idle connections (greeting read, then silent): server memory")
    tee(out, "")
    tee(out, f"{'system':34} {'open':>6} {'closed':>6} {'procs':>5} {'VmRSS MiB':>10} "
             f"{'Pss MiB':>8} {'before':>7} {'KiB/conn (Pss)':>14}")
    for system in systems:
        before = tree_memory(system.pid)
        opened, after, closed = asyncio.run(hold_idle(system.pid, system.port, count, 120))
        rss = sum(m.rss_kib for m in after)
        pss = sum(m.pss_kib for m in after)
        pss0 = sum(m.pss_kib for m in before)
        per = (pss - pss0) / opened if opened else float("nan")
        tee(out, f"{system.label:34} {opened:6d} {closed:6d} {len(after):5d} {mib(rss):>10} "
                 f"{mib(pss):>8} {mib(pss0):>7} {per:14.1f}")
        time.sleep(2)
    tee(out, "")
    tee(out, "VmRSS: the sum over the server's processes (pages shared by forked workers "
             "count once per process); Pss: shared pages divided among their users; "
             "before: Pss with no connection.")


# ---------------------------------------------------------------------------- report


def fmt(v: float, digits: int = 1) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"


HEAD = (f"{'system':34} {'msgs/s':>7} {'x chasquid':>10} {'CPU ms/msg':>10} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'lat n':>6} {'acc/deliv':>11} {'errors':>6}")


def row(label: str, rate: float, ratio: float, cpu: float, p50: float, p99: float, n: int,
        acc: str, errs: int) -> str:
    return (f"{label:34} {rate:7.0f} {fmt(ratio, 2):>10} {fmt(cpu, 2):>10} {fmt(p50):>7} "
            f"{fmt(p99):>7} {n:6d} {acc:>11} {errs:6d}")


def machine_header(args: argparse.Namespace, dns_kind: str) -> list[str]:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cs %s"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"# bench/compare.py, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"# {os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()} ({loop}); load average at start: "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
        f"# tampu at {commit}",
        f"# {NOISE_NOTE}",
    ] + ([f"# {args.idle} idle connections per system; DNS: {dns_kind}; tampu's [server] "
          f"max_connections raised to {args.idle + 1000} (the shipped 1,000 per process "
          "would refuse the rest)"] if args.idle else [
        f"# load: smtp-source + latency probe, {args.sessions} sessions in all "
        f"({args.probe_sessions} of them the probe), {args.messages} messages of "
        f"{args.size} B per run + the probe's, a new connection per message; "
        f"{args.rounds} rounds; DNS: {dns_kind} on loopback, SPF record TTL {args.spf_ttl} s "
        "(TTL 0 for the -ttl0 variant)",
    ])


def ratios_to_chasquid(rounds: list[list[Run]], name: str) -> list[float]:
    """Per round: the system's msgs/s divided by chasquid's in the same round."""
    out = []
    for rnd in rounds:
        rates = {r.system: r.rate for r in rnd}
        if rates.get("chasquid") and name in rates:
            out.append(rates[name] / rates["chasquid"])
    return out


def report(systems: list[System], rounds: list[list[Run]], out: IO[str] | None) -> None:
    labels = {s.name: s.label for s in systems}
    for i, runs in enumerate(rounds, 1):
        tee(out, f"round {i}")
        tee(out, HEAD)
        base = next((r.rate for r in runs if r.system == "chasquid"), float("nan"))
        for r in runs:
            tee(out, row(labels[r.system], r.rate, r.rate / base, r.cpu_ms,
                         1000 * percentile(r.latencies, 50), 1000 * percentile(r.latencies, 99),
                         len(r.latencies), f"{r.accepted}/{r.delivered}", r.failed))
            for e in r.errors[:2]:
                tee(out, f"    {e[:150]}")
        tee(out, "")
    tee(out, f"medians over {len(rounds)} rounds (latency: all rounds' probe samples pooled)")
    tee(out, HEAD)
    for s in systems:
        runs = [r for rnd in rounds for r in rnd if r.system == s.name]
        ratios = ratios_to_chasquid(rounds, s.name)
        lat = [x for r in runs for x in r.latencies]
        tee(out, row(s.label, statistics.median(r.rate for r in runs),
                     statistics.median(ratios) if ratios else float("nan"),
                     statistics.median(r.cpu_ms for r in runs),
                     1000 * percentile(lat, 50), 1000 * percentile(lat, 99), len(lat),
                     f"{sum(r.accepted for r in runs)}/{sum(r.delivered for r in runs)}",
                     sum(r.failed for r in runs)))
    tee(out, "")


def memory_report(systems: list[System], out: IO[str] | None) -> dict[str, float]:
    """Prints each server process's memory; returns each system's largest VmRSS in MiB."""
    tee(out, "memory after the rounds (per process: VmRSS / Pss MiB)")
    largest = {}
    for s in systems:
        mem = tree_memory(s.pid)
        parts = ", ".join(f"{m.name}[{m.pid}] {mib(m.rss_kib)} / {mib(m.pss_kib)}" for m in mem)
        tee(out, f"  {s.label:34} {parts}")
        largest[s.name] = max((m.rss_kib / 1024 for m in mem), default=float("nan"))
    tee(out, "")
    return largest


def fsync_pass(systems: list[System], base: Path, args: argparse.Namespace,
               out: IO[str] | None) -> dict[str, float]:
    tee(out, f"fsyncs per message: strace -f -c -e trace={FsyncCounter.CALLS} on the server "
             f"tree, {args.fsync_messages} messages at {args.sessions} sessions, until all "
             "are in the Maildir")
    result = {}
    for s in systems:
        counter = FsyncCounter(s.pid, base / f"strace-{s.name}.txt")
        counter.start()
        try:
            run = asyncio.run(load(s, sessions=args.sessions, messages=args.fsync_messages,
                                   size=args.size, probes=0, limit_s=args.timeout))
        finally:
            calls = counter.stop()
        total = sum(calls.values())
        per = total / run.accepted if run.accepted else float("nan")
        result[s.name] = per
        detail = ", ".join(f"{k} {v}" for k, v in sorted(calls.items())) or "none"
        tee(out, f"  {s.label:34} {fmt(per, 2):>6} per message ({detail}; {run.accepted} "
                 f"accepted, {run.delivered} delivered; {counter.attached} threads attached)")
    tee(out, "")
    return result


def targets(systems: list[System], rounds: list[list[Run]], fsyncs: dict[str, float],
            largest_rss: dict[str, float], out: IO[str] | None) -> None:
    """Issue 12's targets, each checked on this run's medians."""
    def med(name: str, what: str) -> float:
        runs = [r for rnd in rounds for r in rnd if r.system == name]
        if not runs:
            return float("nan")
        if what == "ratio":
            vals = ratios_to_chasquid(rounds, name)
            return statistics.median(vals) if vals else float("nan")
        if what == "cpu":
            return statistics.median(r.cpu_ms for r in runs)
        lat = [x for r in runs for x in r.latencies]
        return 1000 * percentile(lat, 50 if what == "p50" else 99)

    names = {s.name for s in systems}
    if "chasquid" not in names or "tampu-w2" not in names:
        return
    checks = [
        ("throughput, workers = 2", med("tampu-w2", "ratio"), ">=", 2.0, "x"),
        ("server CPU per message, workers = 2", med("tampu-w2", "cpu"), "<=", 3.0, " ms"),
        ("p99 of the final 250, workers = 2", med("tampu-w2", "p99"), "<=", 50.0, " ms"),
        ("p50 of the final 250, workers = 2 (<= chasquid's)", med("tampu-w2", "p50"), "<=",
         med("chasquid", "p50"), " ms"),
        ("fsyncs per message, workers = 2", fsyncs.get("tampu-w2", float("nan")), "<=", 1.0,
         ""),
        ("VmRSS of the largest process after the rounds, workers = 2",
         largest_rss.get("tampu-w2", float("nan")), "<=", 40.0, " MiB"),
    ]
    if "tampu-w2-ttl0" in names:
        checks.append(("throughput, SPF TTL 0", med("tampu-w2-ttl0", "ratio"), ">=", 1.7, "x"))
    tee(out, "issue 12's targets on this run")
    for what, value, op, goal, unit in checks:
        ok = value == value and (value >= goal if op == ">=" else value <= goal)
        tee(out, f"  {'met ' if ok else 'NOT '} {what}: {fmt(value, 2)}{unit} (target {op} "
                 f"{fmt(goal, 2)}{unit})")
    tee(out, "")


# ---------------------------------------------------------------------------- main


def parse_systems(text: str) -> list[tuple[str, int, bool]]:
    out = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name == "chasquid":
            out.append((name, 0, False))
            continue
        m = re.fullmatch(r"tampu-w(\d+)(-ttl0)?", name)
        if not m:
            raise SystemExit(f"unknown system {name!r}: chasquid, tampu-wN or tampu-wN-ttl0")
        out.append((name, int(m.group(1)), bool(m.group(2))))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="chasquid,tampu-w1,tampu-w2,tampu-w2-ttl0")
    p.add_argument("-r", "--rounds", type=int, default=5)
    p.add_argument("-s", "--sessions", type=int, default=20, help="sessions in all")
    p.add_argument("-m", "--messages", type=int, default=2000, help="smtp-source's messages")
    p.add_argument("-l", "--size", type=int, default=2000, help="payload bytes per message")
    p.add_argument("--probe-sessions", type=int, default=2,
                   help="of --sessions, how many are the latency probe (0: no latency)")
    p.add_argument("--warmup", type=int, default=200, help="messages per system first")
    p.add_argument("--fsync-messages", type=int, default=200,
                   help="messages of the strace run (0: no fsync count)")
    p.add_argument("--spf-ttl", type=int, default=60)
    p.add_argument("--idle", type=int, default=0, metavar="N",
                   help="instead of the rounds: total memory with N idle connections")
    p.add_argument("--timeout", type=float, default=300, help="seconds per load at most")
    p.add_argument("--max-minutes", type=float, default=60, help="no new run after this")
    p.add_argument("--dns", choices=["auto", "dnsmasq", "python"], default="auto")
    p.add_argument("--output", type=Path, help="also write the report to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    if args.sessions < 1 or args.rounds < 1 or args.messages < 1:
        raise SystemExit("--sessions, --rounds and --messages must be positive")
    if shutil.which("smtp-source") is None and not os.path.exists("/usr/sbin/smtp-source"):
        raise SystemExit("smtp-source (Debian package postfix) is not installed")
    wanted = parse_systems(args.systems)
    if args.idle:
        limit = raise_fd_limit()
        if limit < args.idle + 1000:
            raise SystemExit(f"the fd limit ({limit}) is too low for {args.idle} connections")
    out = open(args.output, "w") if args.output else None
    end = time.monotonic() + 60 * args.max_minutes
    base = make_tmp("bench-compare-")
    dns_servers: list[LoopbackDns] = []
    systems: list[System] = []
    try:
        records = {SENDER_DOMAIN: SPF_RECORD}
        need53 = any(n == "chasquid" for n, _, _ in wanted)
        host, port = (port53_address(), 53) if need53 else ("127.0.0.1", 0)
        dns = LoopbackDns(records, ttl=args.spf_ttl, prefer=args.dns, host=host, port=port)
        dns_servers.append(dns)
        dns0 = None
        if any(ttl0 for _, _, ttl0 in wanted):
            dns0 = LoopbackDns(records, ttl=0, prefer=args.dns)
            dns_servers.append(dns0)
        for text in machine_header(args, dns.kind):
            tee(out, text)
        for name, workers, ttl0 in wanted:
            if name == "chasquid":
                systems.append(start_chasquid(base, dns))
            else:
                systems.append(start_tampu(base, name, workers, dns0 if ttl0 and dns0 else dns,
                                           args.idle + 1000 if args.idle else None))
        tee(out, "# systems: " + "; ".join(f"{s.label} (pid {s.pid}, 127.0.0.1:{s.port}, "
                                           f"DNS {s.dns})" for s in systems))
        tee(out, "")
        if args.idle:
            idle_pass(systems, args.idle, out)
            return 0
        for s in systems:  # imports, caches, first files: not part of the measurement
            warm = asyncio.run(load(s, sessions=args.sessions, messages=args.warmup,
                                    size=args.size, probes=0, limit_s=args.timeout))
            if warm.accepted < args.warmup or warm.delivered < warm.accepted:
                tee(out, f"warning: {s.label}: warm-up {warm.accepted} accepted, "
                         f"{warm.delivered} delivered: {warm.errors[:2]}")
            tee(out, f"# SPF in a delivered warm-up message, {s.label}: {spf_seen(s)}")
        rounds: list[list[Run]] = []
        for i in range(args.rounds):
            if time.monotonic() > end:
                tee(out, f"stopped after {i} rounds (--max-minutes)")
                break
            runs = []
            for s in systems:
                runs.append(asyncio.run(load(s, sessions=args.sessions,
                                             messages=args.messages, size=args.size,
                                             probes=args.probe_sessions,
                                             limit_s=args.timeout)))
                print(f"  round {i + 1} {s.label}: {runs[-1].rate:.0f} msgs/s, "
                      f"{runs[-1].cpu_ms:.2f} ms CPU/msg", file=sys.stderr, flush=True)
            rounds.append(runs)
        if rounds:
            report(systems, rounds, out)
        largest_rss = memory_report(systems, out)
        fsyncs = (fsync_pass(systems, base, args, out)
                  if args.fsync_messages and time.monotonic() < end else {})
        if rounds:
            targets(systems, rounds, fsyncs, largest_rss, out)
        tee(out, f"# load average at the end: "
                 f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        for s in systems:
            problems = [ln for ln in s.log.read_text(errors="replace").splitlines()
                        if " ERROR " in ln or "Traceback" in ln][:3]
            if problems:
                tee(out, f"# {s.label}: server errors, first: {problems[0][:200]}")
    finally:
        for s in systems:
            stop(s.proc)
        for d in dns_servers:
            d.stop()
        if out is not None:
            out.close()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
