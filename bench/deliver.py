#!/usr/bin/env python3
"""Delivery benchmark: end-to-end throughput from "250" to delivered, on two paths.

* **local**: N clients send M messages each to a local user over the smtp listener; tampu
  delivers them into a Maildir (``delivery_maildir``);
* **relay**: N clients authenticate on the submission listener (STARTTLS + AUTH) and send M
  messages each to ``rcpt@remote.test``; tampu looks up the MX (``tests/dnsserver.py`` on
  loopback: MX -> 127.0.0.2) and relays them with ``delivery_smtp`` to Postfix's ``smtp-sink``
  listening on 127.0.0.2.

example.test has a DKIM key (made with ``tampu dkim keygen``), so relayed mail is signed as a
real server's would be.

For each path it prints the accept rate (until the last "250") and the end-to-end rate (until
the last message is delivered: in the Maildir, or counted by smtp-sink with the queue empty).

    python bench/deliver.py                     # 10 clients x 50 messages per path
    python bench/deliver.py -c 20 -m 100 --size 10000 --path relay

It starts everything it uses (DNS server thread, smtp-sink, ``tampu serve``) and stops them by
their PID at the end. Bounded: each phase stops after --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402 - after sys.path
    PASSWORD,
    free_port,
    wait_port,
    write_bench_config,
)

SINK_HOST = "127.0.0.2"


def make_body(n: int, size: int, to: str) -> bytes:
    head = (f"From: user@example.test\r\nTo: {to}\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench-{n}@example.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * (max(0, size - len(head)) // len(line))


def write_config(root: Path, smtp: int, submission: int, dns_port: int, sink_port: int) -> None:
    write_bench_config(root, f"""\
        # delivery benchmark configuration (fsync on)
        [server]
        hostname = "bench.test"
        self_signed_cert = true
        max_queue_items = 1000000
        max_connections = 5000
        dns_servers = ["127.0.0.1:{dns_port}"]
        dns_timeout = 2
        log_level = "warning"
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{smtp}"]
        [server.listeners.submission]
        kind = "submission"
        addresses = ["127.0.0.1:{submission}"]
        """)
    (root / "conf.d" / "99-bench.toml").write_text(
        f"[plugins.delivery_smtp]\nport = {sink_port}\n")


async def client(port: int, *, auth: bool, first: int, count: int, size: int, to: str,
                 errors: list[str], deadline: float) -> int:
    import aiosmtplib

    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # the self-signed certificate
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=auth, tls_context=tls,
                           local_hostname="bench.test", timeout=60)
    sent = 0
    try:
        await smtp.connect()
        if auth:
            await smtp.login("user@example.test", PASSWORD)
        for n in range(first, first + count):
            if time.monotonic() > deadline:
                break
            await smtp.sendmail("user@example.test" if auth else "a@example.org", [to],
                                make_body(n, size, to))
            sent += 1
        await smtp.quit()
    except Exception as exc:  # counted and reported; the run goes on
        errors.append(f"{type(exc).__name__}: {exc}")
    return sent


async def send_all(port: int, *, auth: bool, clients: int, messages: int, size: int,
                   to: str, deadline: float) -> tuple[int, list[str]]:
    errors: list[str] = []
    counts = await asyncio.gather(*(
        client(port, auth=auth, first=i * messages, count=messages, size=size, to=to,
               errors=errors, deadline=deadline) for i in range(clients)))
    return sum(counts), errors


def run_path(port: int, *, auth: bool, clients: int, messages: int, size: int, to: str,
             delivered: Callable[[], int], done: Callable[[], bool],
             limit_s: float) -> dict[str, float]:
    """Send everything, then wait (polling, bounded) until all of it is delivered."""
    deadline = time.monotonic() + limit_s
    start = time.perf_counter()
    accepted, errors = asyncio.run(send_all(port, auth=auth, clients=clients,
                                            messages=messages, size=size, to=to,
                                            deadline=deadline))
    accepted_at = time.perf_counter()
    while (delivered() < accepted or not done()) and time.monotonic() < deadline:
        time.sleep(0.02)
    finished_at = time.perf_counter()
    if errors:
        print(f"  first errors: {errors[:3]}", file=sys.stderr)
    return {
        "accepted": accepted, "delivered": delivered(), "errors": len(errors),
        "accept_s": accepted_at - start, "total_s": finished_at - start,
        "accept_rate": accepted / (accepted_at - start),
        "e2e_rate": delivered() / (finished_at - start),
    }


def count_files(folder: Path) -> Callable[[], int]:
    def count() -> int:
        try:
            return sum(1 for _ in os.scandir(folder))
        except FileNotFoundError:
            return 0
    return count


def sink_counter(path: Path) -> Callable[[], int]:
    def count() -> int:
        found = re.findall(rb"mesg=(\d+)", path.read_bytes()[-200:])
        return int(found[-1]) if found else 0
    return count


def report(name: str, clients: int, messages: int, size: int, res: dict[str, float]) -> None:
    print(f"{name}: {clients} clients x {messages} msgs of {size} B")
    print(f"  accepted {res['accepted']:.0f} in {res['accept_s']:.2f}s "
          f"({res['accept_rate']:.0f} msgs/s); delivered {res['delivered']:.0f} in "
          f"{res['total_s']:.2f}s end to end ({res['e2e_rate']:.0f} msgs/s); "
          f"{res['errors']:.0f} client errors")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--clients", type=int, default=10)
    p.add_argument("-m", "--messages", type=int, default=50, help="messages per client")
    p.add_argument("--size", type=int, default=2000, help="message size in bytes")
    p.add_argument("--path", choices=["both", "local", "relay"], default="both")
    p.add_argument("--timeout", type=float, default=120, help="seconds per phase at most")
    args = p.parse_args()

    from tests.dnsserver import DNSServer

    sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if args.path != "local" and not os.path.exists(sink_bin):
        raise SystemExit("smtp-sink (Postfix) is not installed; use --path local")
    dns = DNSServer({
        "example.org": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
        "remote.test": {"MX": ["10 mx.remote.test."]},
        "mx.remote.test": {"A": [SINK_HOST]},
    })
    tmp = Path(tempfile.mkdtemp(prefix="tampu-bench-deliver-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dns.start()
        smtp_port, sub_port, sink_port = free_port(), free_port(), free_port(SINK_HOST)
        write_config(tmp, smtp_port, sub_port, dns.port, sink_port)
        sink_out = tmp / "sink.out"
        if args.path != "local":
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            with open(sink_out, "wb") as out:
                procs.append(subprocess.Popen([sink_bin, *user, "-c",
                                               f"{SINK_HOST}:{sink_port}", "256"],
                                              stdout=out, stderr=subprocess.STDOUT))
            wait_port(SINK_HOST, sink_port)
        tampu = shutil.which("tampu") or str(Path(sys.executable).parent / "tampu")
        with open(tmp / "serve.log", "wb") as log:
            procs.append(subprocess.Popen([tampu, "serve", "--config-dir", str(tmp)],
                                          stdout=log, stderr=subprocess.STDOUT))
        wait_port("127.0.0.1", smtp_port)
        queue = tmp / "data" / "queue"

        def queue_empty() -> bool:
            return not any(queue.glob("*.item"))

        if args.path in ("both", "local"):
            maildir = tmp / "data" / "mail" / "example.test" / "user" / "new"
            res = run_path(smtp_port, auth=False, clients=args.clients,
                           messages=args.messages, size=args.size, to="user@example.test",
                           delivered=count_files(maildir), done=queue_empty,
                           limit_s=args.timeout)
            report("local (smtp -> Maildir)", args.clients, args.messages, args.size, res)
        if args.path in ("both", "relay"):
            res = run_path(sub_port, auth=True, clients=args.clients,
                           messages=args.messages, size=args.size, to="rcpt@remote.test",
                           delivered=sink_counter(sink_out), done=queue_empty,
                           limit_s=args.timeout)
            report("relay (submission+AUTH -> MX 127.0.0.2 smtp-sink)", args.clients,
                   args.messages, args.size, res)
        problems = [ln for ln in (tmp / "serve.log").read_text().splitlines()
                    if " ERROR " in ln]
        if problems:
            print(f"  server errors ({len(problems)}), first: {problems[0]}", file=sys.stderr)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        dns.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
