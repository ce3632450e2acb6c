#!/usr/bin/env python3
"""Reception benchmark: N concurrent clients each send M messages to a local user over loopback.

Starts its own `tampu serve` (subprocess, fsync on, full default pipeline: SPF, DKIM and DMARC
against a DNS server on loopback, local delivery into a Maildir) unless --target HOST:PORT is
given, then prints messages/s, p50/p99 latency of the final "250" (from the end of DATA to the
reply) and the server's CPU milliseconds per message (utime+stime of the server's process tree
from /proc, exited children included, from the start of the load until the last message is in
the Maildir).

    python bench/accept.py                  # 20 clients x 100 messages, new connection each
    python bench/accept.py -c 50 -m 200 --size 10000 --workers 2
    python bench/accept.py --disable spf --disable maillog     # what those two cost
    python bench/accept.py --auth           # submission, STARTTLS + AUTH PLAIN: DKIM signing
    python bench/accept.py --dkim-signed    # messages signed by example.org: DKIM verification
    python bench/accept.py --plugins-table  # default pipeline, then one run per plugin off
    python bench/accept.py --target 127.0.0.1:2601 --pid 1234  # any SMTP server (chasquid)

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402 - after sys.path
    LOCAL_DOMAIN,
    LOCAL_USER,
    PASSWORD,
    SENDER,
    SENDER_DOMAIN,
    SPF_RECORD,
    LoopbackDns,
    SmtpClient,
    dkim_sign_body,
    empty_folder,
    free_port,
    make_tmp,
    message_body,
    percentile,
    start,
    stop,
    tampu_bin,
    tree_cpu_seconds,
    wait_delivered,
    wait_port,
    write_bench_config,
)

SELECTOR = "bench"
ESSENTIAL = {
    "localusers": "without it no recipient is accepted (the core fails closed)",
    "delivery_maildir": "without it the messages go elsewhere (the MDA)",
}


@dataclass
class Result:
    messages: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    delivered: int = 0
    cpu_s: float = float("nan")
    authres: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.messages if self.messages else float("nan")

    @property
    def p50_ms(self) -> float:
        return 1000 * percentile(self.latencies, 50)

    @property
    def p99_ms(self) -> float:
        return 1000 * percentile(self.latencies, 99)


@dataclass
class Load:
    host: str
    port: int
    clients: int
    messages: int
    body: bytes
    sender: str
    rcpt: str
    reuse: bool
    auth: bool
    limit_s: float


async def client(load: Load, count: int, res: Result, deadline: float) -> None:
    conn: SmtpClient | None = None
    login = (LOCAL_USER, PASSWORD) if load.auth else None
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            if conn is None:
                conn = SmtpClient(load.host, load.port)
                await conn.connect(starttls=load.auth, login=login)
            else:
                await conn.rset()
            res.latencies.append(await conn.send(load.sender, load.rcpt, load.body))
            res.messages += 1
            if not load.reuse:
                await conn.quit(wait=False)
                conn = None
        except Exception as exc:  # counted and reported, the run goes on
            res.errors.append(f"{type(exc).__name__}: {exc}")
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        await conn.quit()


async def run_load(load: Load, count: int) -> Result:
    """``load.clients`` clients sharing ``count`` messages."""
    res = Result()
    deadline = time.monotonic() + load.limit_s
    share = [count // load.clients + (i < count % load.clients) for i in range(load.clients)]
    start_t = time.perf_counter()
    await asyncio.gather(*(client(load, n, res, deadline) for n in share if n))
    res.seconds = time.perf_counter() - start_t
    return res


# ---------------------------------------------------------------------------- one server


def write_config(root: Path, smtp: int, submission: int, dns: str, workers: int,
                 disable: list[str], settings: list[str] | None = None) -> None:
    write_bench_config(root, f"""\
        # benchmark configuration (fsync on)
        [server]
        hostname = "bench.test"
        self_signed_cert = true
        max_queue_items = 1000000
        max_connections = 5000
        workers = {workers}
        dns_servers = ["{dns}"]
        dns_timeout = 2
        log_level = "warning"
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{smtp}"]
        [server.listeners.submission]
        kind = "submission"
        addresses = ["127.0.0.1:{submission}"]
        """)
    # the shipped per-user limit (1,000 recipients an hour) would refuse an --auth run
    (root / "conf.d" / "98-bench-limits.toml").write_text(
        "[plugins.ratelimit]\nrecipients_per_hour = 0\n")
    if settings:  # --set KEY=VALUE: [server] settings (TOML values), e.g. journal_max_size=0
        (root / "conf.d" / "97-bench-set.toml").write_text(
            "[server]\n" + "".join(f"{kv.partition('=')[0].strip()} = "
                                   f"{kv.partition('=')[2].strip()}\n" for kv in settings))
    if disable:  # for finding where the time goes: the pipeline without some plugins
        (root / "conf.d" / "99-bench-disable.toml").write_text(
            "".join(f"[plugins.{name}]\nenabled = false\n" for name in disable))


def enabled_plugins(root: Path) -> list[str]:
    from tampu.config import load_config

    return [name for name, table in load_config(root).plugins.items() if table.enabled]


def first_message_headers(folder: Path) -> str:
    """The Authentication-Results and DKIM-Signature lines of one delivered message."""
    try:
        path = next(os.scandir(folder)).path
    except (StopIteration, FileNotFoundError):
        return "(no message delivered)"
    head = Path(path).read_bytes().split(b"\n\n", 1)[0].decode("utf-8", "replace")
    unfolded = head.replace("\n\t", " ").replace("\n ", " ").splitlines()
    keep = [ln for ln in unfolded if ln.lower().startswith("authentication-results:")]
    keep += [f"DKIM-Signature: d={ln.split(' d=')[1].split(';')[0]}" if " d=" in ln else ln
             for ln in unfolded if ln.lower().startswith("dkim-signature:")]
    return " | ".join(" ".join(ln.split()) for ln in keep) or "(no such header)"


def measure(args: argparse.Namespace, dns: LoopbackDns | None, body: bytes,
            disable: list[str]) -> Result:
    """Start tampu (or use --target), warm up, run the load, wait for delivery."""
    sender = LOCAL_USER if args.auth else SENDER
    if args.target:
        host, _, port_s = args.target.rpartition(":")
        load = Load(host, int(port_s), args.clients, args.messages, body, sender, args.rcpt,
                    args.reuse, args.auth, args.timeout)
        pid = args.pid
        if args.warmup:
            asyncio.run(run_load(load, args.warmup))
        cpu0 = tree_cpu_seconds(pid) if pid else float("nan")
        res = asyncio.run(run_load(load, args.clients * args.messages))
        if pid:
            time.sleep(args.settle)  # delivery by a server we cannot look into
            res.cpu_s = tree_cpu_seconds(pid) - cpu0
        return res
    assert dns is not None
    tmp = make_tmp("tampu-bench-")
    proc = None
    try:
        smtp, submission = free_port(), free_port()
        write_config(tmp, smtp, submission, dns.address, args.workers, disable, args.set)
        proc = start([tampu_bin(), "serve", "--config-dir", str(tmp)], tmp / "serve.log")
        wait_port("127.0.0.1", smtp, timeout=60, proc=proc)
        maildir = tmp / "data" / "mail" / LOCAL_DOMAIN / "user" / "new"
        load = Load("127.0.0.1", submission if args.auth else smtp, args.clients,
                    args.messages, body, sender, args.rcpt, args.reuse, args.auth,
                    args.timeout)
        if args.keep:
            print(f"tampu listening on 127.0.0.1:{smtp} (submission {submission}, config "
                  f"{tmp}) pid {proc.pid}; Ctrl-C or SIGTERM to stop", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            signal.pause()
        if args.warmup:
            warm = asyncio.run(run_load(load, args.warmup))
            wait_delivered([maildir], warm.messages, timeout=60)
            empty_folder(maildir)
        cpu0 = tree_cpu_seconds(proc.pid)
        res = asyncio.run(run_load(load, args.clients * args.messages))
        if args.rcpt == LOCAL_USER:
            res.delivered = wait_delivered([maildir], res.messages, timeout=120)
        res.cpu_s = tree_cpu_seconds(proc.pid) - cpu0
        res.authres = first_message_headers(maildir)
        problems = [ln for ln in (tmp / "serve.log").read_text(errors="replace").splitlines()
                    if " ERROR " in ln][:1]
        if problems:
            res.errors.append(f"server log: {problems[0][:200]}")
        return res
    finally:
        if proc is not None:
            stop(proc)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def describe(args: argparse.Namespace) -> str:
    what = args.target or (f"tampu (workers={args.workers}, fsync on, delivery to Maildir"
                           + (f", without {', '.join(args.disable)}" if args.disable else "")
                           + ")")
    mode = ("submission + STARTTLS + AUTH PLAIN as user@example.test" if args.auth
            else "smtp, DKIM-signed by example.org" if args.dkim_signed else "smtp")
    return (f"{what}: {args.clients} clients x {args.messages} msgs of {args.size} B, "
            f"{'reused' if args.reuse else 'new'} connections, {mode}")


def print_result(res: Result) -> None:
    print(f"  {res.messages} accepted, {len(res.errors)} errors in {res.seconds:.2f}s: "
          f"{res.rate:.0f} msgs/s, p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms, "
          f"server CPU {res.cpu_ms:.2f} ms/msg"
          + (f", {res.delivered} delivered" if res.delivered else ""))
    if res.authres:
        print(f"  a delivered message: {res.authres}")
    if res.errors:
        print(f"  first errors: {res.errors[:3]}", file=sys.stderr)


def median_result(runs: list[Result]) -> tuple[float, float]:
    return (statistics.median(r.rate for r in runs), statistics.median(r.cpu_ms for r in runs))


def plugins_table(args: argparse.Namespace, dns: LoopbackDns, body: bytes) -> None:
    """The default pipeline (before and after), then one run per enabled plugin disabled."""
    probe = make_tmp("tampu-bench-plugins-")
    try:
        write_config(probe, free_port(), free_port(), dns.address, args.workers, args.disable)
        plugins = enabled_plugins(probe)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    skipped = {p: why for p, why in ESSENTIAL.items() if p in plugins}
    if args.auth:
        skipped["auth"] = "--auth needs it"
    todo = [p for p in plugins if p not in skipped]
    print(describe(args), flush=True)
    base: list[Result] = []
    without: dict[str, list[Result]] = {p: [] for p in todo}
    deltas: dict[str, list[float]] = {p: [] for p in todo}

    def run(disable: list[str], rnd: int) -> Result:
        res = measure(args, dns, body, args.disable + disable)
        print(f"  round {rnd + 1}, without {', '.join(disable) or 'nothing'}: "
              f"{res.rate:.0f} msgs/s, {res.cpu_ms:.2f} ms/msg ({len(res.errors)} errors)",
              file=sys.stderr, flush=True)
        return res

    for rnd in range(args.repeat):  # interleaved rounds: drift hits every row alike
        first = run([], rnd)  # the default pipeline before and after each round
        shift = rnd * len(todo) // args.repeat
        order = todo[shift:] + todo[:shift]
        got = {name: run([name], rnd) for name in order}  # rotated: no row always last
        last = run([], rnd)
        base += [first, last]
        ref = (first.cpu_ms + last.cpu_ms) / 2
        for name, res in got.items():
            without[name].append(res)
            deltas[name].append(res.cpu_ms - ref)
    base_rate, base_cpu = median_result(base)
    spread = [r.cpu_ms for r in base]
    print()
    print(f"{args.repeat} interleaved rounds (the plugins in a rotated order, the default "
          "pipeline first and last); each figure is a median over the rounds; Δ CPU is the "
          "median of each round's difference to the mean of that round's two default runs")
    print()
    print("| plugin disabled | msgs/s | Δ msgs/s | server CPU ms/msg | Δ CPU ms/msg |")
    print("|---|---|---|---|---|")
    print(f"| none (default pipeline; CPU {min(spread):.2f}–{max(spread):.2f} in its "
          f"{len(spread)} runs) "
          f"| {base_rate:.0f} | — | {base_cpu:.2f} | — |")
    rows = [(name, *median_result(without[name]), statistics.median(deltas[name]))
            for name in todo]
    for name, rate, cpu, delta in sorted(rows, key=lambda r: r[3]):
        print(f"| {name} | {rate:.0f} | {100 * (rate / base_rate - 1):+.0f}% | {cpu:.2f} | "
              f"{delta:+.2f} |")
    for name, why in skipped.items():
        print(f"| {name} | not measured: {why} | | | |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--clients", type=int, default=20)
    p.add_argument("-m", "--messages", type=int, default=100, help="messages per client")
    p.add_argument("--size", type=int, default=2000, help="payload bytes per message")
    p.add_argument("--reuse", action="store_true", help="one connection per client (RSET)")
    p.add_argument("--workers", type=int, default=1, help="tampu reception processes")
    p.add_argument("--target", help="HOST:PORT of a running server instead of starting tampu")
    p.add_argument("--pid", type=int, help="with --target: the server's PID, for its CPU")
    p.add_argument("--settle", type=float, default=3.0,
                   help="with --target --pid: seconds to wait for delivery before the CPU "
                   "sample")
    p.add_argument("--rcpt", default=LOCAL_USER)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--warmup", type=int, default=50, help="messages sent before measuring")
    p.add_argument("--dns", choices=["auto", "dnsmasq", "python"], default="auto",
                   help="DNS server on loopback: Debian's dnsmasq (auto: if installed) or "
                   "tests/dnsserver.py")
    p.add_argument("--ttl", type=int, default=60, help="TTL of the loopback DNS records "
                   "(SPF, DKIM key, DMARC); 0: a lookup per message")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a [server] setting (TOML value), e.g. journal_max_size=0 (no "
                   "decision journal); repeatable")
    p.add_argument("--disable", action="append", default=[], metavar="PLUGIN",
                   help="disable a default plugin (repeatable), to see what it costs")
    p.add_argument("--auth", action="store_true", help="send on the submission listener with "
                   "STARTTLS and AUTH PLAIN as user@example.test, From: user@example.test: the "
                   "messages are DKIM-signed (key made with tampu dkim keygen)")
    p.add_argument("--dkim-signed", action="store_true", help="messages carry a DKIM "
                   "signature of example.org whose key is in the loopback DNS (DMARC "
                   "p=reject record too), so DKIM and DMARC verification do real work")
    p.add_argument("--plugins-table", action="store_true", help="run the default pipeline, "
                   "then once per enabled plugin disabled; print a markdown table of costs")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved rounds of --plugins-table")
    p.add_argument("--keep", action="store_true", help="keep tampu running (prints its port)")
    args = p.parse_args()
    if args.clients < 1 or args.messages < 1 or args.repeat < 1:
        raise SystemExit("--clients, --messages and --repeat must be positive")

    sender = LOCAL_USER if args.auth else SENDER
    body = message_body(args.size, sender=sender, rcpt=args.rcpt)
    records = {SENDER_DOMAIN: SPF_RECORD, f"_dmarc.{SENDER_DOMAIN}": "v=DMARC1; p=reject"}
    if args.dkim_signed:
        from tampu.plugins.dkim.keys import generate_key, parse_key

        pem = generate_key("rsa2048")
        key = parse_key(pem, Path(f"dkim:{SELECTOR}.pem"), SENDER_DOMAIN, SELECTOR)
        records[f"{SELECTOR}._domainkey.{SENDER_DOMAIN}"] = key.txt_record()
        body = dkim_sign_body(body, SENDER_DOMAIN, SELECTOR, pem)
    dns = None if args.target else LoopbackDns(records, ttl=args.ttl, prefer=args.dns)
    try:
        if args.plugins_table:
            if dns is None:
                raise SystemExit("--plugins-table starts its own servers: no --target")
            plugins_table(args, dns, body)
            return 0
        res = measure(args, dns, body, args.disable)
        print(describe(args))
        print_result(res)
    finally:
        if dns is not None:
            dns.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
