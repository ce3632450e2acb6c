"""A real cluster: three ``tampu serve`` nodes (127.0.0.2/3/4) sharing one PostgreSQL.

Mail goes to all three (node c with two reception processes, whose items any node claims);
the recipients are in a remote domain whose MX (127.0.0.5) is a real SMTP server (aiosmtpd)
that takes 0.3 to 1.8 s per message and refuses some recipients once (451), so that the first
node has deliveries in flight and items due for a retry when it is killed with SIGKILL. The
test shows that every message acknowledged with 250 is delivered (the dead node's in-flight
items by the others once its leases expire, its retries by whichever node is free), that
duplicates happen only for attempts that were in flight, that a security level learned on one
node is enforced on another, and that a connection rate limit holds across nodes. Every wait
is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import email
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tampu.testing import make_config_dir
from tests.dnsserver import DNSServer
from tests.helpers import RawClient, run_tampu, tampu_command

NODES = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
MX_HOST = "127.0.0.5"
LEVEL_CLIENT = "127.0.0.8"
RATE_CLIENT = "127.0.0.9"
LEASE = 3.0
RETRY = 4.0
PER_NODE = 20


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.05)


@dataclass
class SlowMX:
    """The remote domain's MX: a DATA takes 1 to 6 times ``delay`` s (by the message's number,
    so that some deliveries end before others); ``slow*`` recipients get one 451."""

    delay: float = 0.3
    lock: threading.Lock = field(default_factory=threading.Lock)
    refused_once: set[str] = field(default_factory=set)
    delivered: list[tuple[str, str, str]] = field(default_factory=list)
    """(Message-ID, recipient, HELO of the delivering node)."""
    in_data: collections.Counter[str] = field(default_factory=collections.Counter)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        with self.lock:
            if address.startswith("slow") and address not in self.refused_once:
                self.refused_once.add(address)
                return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.in_data[session.host_name] += 1
        parsed = email.message_from_bytes(envelope.original_content)
        await asyncio.sleep(self.delay * (1 + int(parsed["Subject"]) % 6))  # 0.3 to 1.8 s
        msgid = parsed["Message-ID"]
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.delivered.append((str(msgid), rcpt, session.host_name))
        return "250 2.0.0 stored"


def node_conf(name: str, port: int, dns_port: int, mx_port: int) -> str:
    return textwrap.dedent(f"""\
        [server]
        hostname = "node-{name}.test"
        node = "{name}"
        local_domains = ["example.test"]
        queue_store = "postgres"
        dns_servers = ["127.0.0.1:{dns_port}"]
        dns_timeout = 2
        command_timeout = 30
        max_errors = 50
        plugin_timeout = 10
        shutdown_timeout = 2
        retry_schedule = [{RETRY}]
        file_check_interval = 0
        max_queue_items = 10000
        workers = {2 if name == "c" else 1}

        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["{NODES[name]}:{port}"]

        [plugins.auth]
        enabled = true
        [plugins.localusers]
        enabled = true
        [plugins.loopdetect]
        enabled = true
        [plugins.relay]
        enabled = true
        trusted_networks = ["127.0.0.1/32"]
        [plugins.spf]
        enabled = true
        [plugins.domaininfo]
        enabled = true
        [plugins.ratelimit]
        enabled = true
        max_connections_per_minute = 4
        max_concurrent = 0
        exempt = ["127.0.0.1/32"]
        [plugins.delivery_smtp]
        enabled = true
        port = {mx_port}
        connect_timeout = 3
        command_timeout = 5
        data_timeout = 5
        [plugins.queue_postgres]
        enabled = true
        dsn = "$env:TAMPU_PG_DSN"
        lease_seconds = {LEASE}
        poll_interval = 0.5
        """)


class Node:
    def __init__(self, name: str, root: Path, port: int, env: dict[str, str]) -> None:
        self.name, self.root, self.port, self.host = name, root, port, NODES[name]
        self.env = env
        self.log = root / "serve.log"
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen([*tampu_command(), "serve", "--config-dir", str(root)],
                                         stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                                         env={**os.environ, **env})

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited: {self.log.read_text()}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"node {self.name} not listening: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def send(node: Node, n: int, rcpt: str) -> str | None:
    """One message through ``node`` from the trusted network; its Message-ID if acknowledged."""
    msgid = f"<{node.name}-{n}@cluster.test>"
    body = (f"From: a@example.org\r\nTo: {rcpt}\r\nSubject: {n}\r\nMessage-ID: {msgid}\r\n\r\n"
            f"message {n} through {node.name}\r\n").encode()
    try:
        with smtplib.SMTP(node.host, node.port, timeout=20, local_hostname="client.test",
                          source_address=("127.0.0.1", 0)) as client:
            client.sendmail("a@example.org", [rcpt], body)
        return msgid
    except (smtplib.SMTPException, OSError):
        return None


def mail_from(node: Node, ca: Any, sender: str, *, tls: bool) -> tuple[int, list[str]]:
    """MAIL FROM over a new connection from LEVEL_CLIENT (SPF passes for sender.test)."""
    with RawClient(node.port, host=node.host, timeout=20, source=LEVEL_CLIENT) as client:
        assert client.reply()[0] == 220
        assert client.cmd("EHLO client.test")[0] == 250
        if tls:
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            client.starttls(ctx)
            assert client.cmd("EHLO client.test")[0] == 250
        return client.cmd(f"MAIL FROM:<{sender}>")


def greeting(node: Node) -> int:
    with socket.create_connection((node.host, node.port), timeout=10,
                                  source_address=(RATE_CLIENT, 0)) as sock:
        return int(sock.makefile("rb").readline()[:3])


@pytest.fixture
def mx() -> Any:
    sink = SlowMX()
    port = free_port(MX_HOST)
    controller = Controller(sink, hostname=MX_HOST, port=port, ready_timeout=5)
    controller.start()
    yield sink, port
    controller.stop()


def test_three_nodes_share_queue_and_state(tmp_path, pg_dsn, postgres, mx, tampu_ca):
    started = time.monotonic()
    sink, mx_port = mx
    env = {"TAMPU_PG_DSN": pg_dsn}
    zone = {"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": [MX_HOST]},
            "sender.test": {"TXT": [f"\"v=spf1 ip4:{LEVEL_CLIENT} -all\""]}}
    with DNSServer(zone) as dns:
        roots = {}
        for name in NODES:
            port = free_port(NODES[name])
            roots[name] = (make_config_dir(tmp_path / name, ca=tampu_ca, base=node_conf(
                name, port, dns.port, mx_port)), port)
        migrated = run_tampu("db", "migrate", "--config-dir", str(roots["a"][0]), env=env)
        assert migrated.returncode == 0, migrated.stderr
        nodes = {name: Node(name, root, port, env) for name, (root, port) in roots.items()}
        try:
            for node in nodes.values():
                node.wait_ready()
            run_cluster(nodes, sink, tampu_ca)
        finally:
            for node in nodes.values():
                node.stop()
    password = pg_dsn.split(":")[2].split("@")[0]
    for node in nodes.values():  # the DSN's secret is never logged
        assert password not in node.log.read_text()
    assert time.monotonic() - started < 60


def run_cluster(nodes: dict[str, Node], sink: SlowMX, ca: Any) -> None:
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    # -------------------------------------------------------------- mail to all three nodes
    jobs = [(node, n, f"{'slow' if n % 2 else 'fast'}-{node.name}-{n}@remote.test")
            for node in nodes.values() for n in range(PER_NODE)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda job: (job, send(*job)), jobs))
    acked = {msgid: job[2] for job, msgid in results if msgid is not None}
    assert len(acked) == len(jobs), "every message is acknowledged"
    slow_a = {rcpt for (node, _, rcpt) in jobs if node is a and rcpt.startswith("slow")}

    # -------------------------------------------------------------- SIGKILL node a mid-delivery
    def a_delivered() -> int:
        with sink.lock:
            return sum(1 for _, _, helo in sink.delivered if helo == "node-a.test")

    wait_until(lambda: slow_a <= sink.refused_once and a_delivered() >= 2, 15,
               "node a delivered some, its slow recipients refused once (waiting to retry)")
    in_flight_a = PER_NODE - a_delivered()  # at most: some are waiting for their retry
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    killed_at = time.monotonic()

    # -------------------------------------------------------------- security level, shared
    assert mail_from(b, ca, "x@sender.test", tls=True)[0] == 250  # node b learns: TLS
    code, lines = mail_from(c, ca, "y@sender.test", tls=False)  # node c enforces it
    assert code == 451 and lines[0].startswith("4.7.3"), (code, lines)
    assert mail_from(c, ca, "z@sender.test", tls=True)[0] == 250
    shown = run_tampu("domaininfo", "show", "sender.test", "--config-dir", str(a.root),
                      env=a.env)  # the dead node's configuration: the same shared state
    assert "incoming=tls_unverified" in shown.stdout, shown.stdout + shown.stderr

    # -------------------------------------------------------------- a rate limit, shared
    greetings = [greeting(node) for node in (b, c, b, c)]
    assert greetings == [220] * 4
    assert greeting(c) == 421 and greeting(b) == 421  # the 5th and 6th, whichever node

    # -------------------------------------------------------------- every 250 delivered
    def delivered() -> set[tuple[str, str]]:
        with sink.lock:
            return {(m, r) for m, r, _ in sink.delivered}

    wanted = set(acked.items())
    wait_until(lambda: wanted <= delivered(), 30,
               f"every acknowledged message delivered; missing "
               f"{sorted(wanted - delivered())[:5]}")
    takeover = time.monotonic() - killed_at
    by_node = collections.Counter(helo for _, _, helo in sink.delivered)
    counts = collections.Counter((m, r) for m, r, _ in sink.delivered)
    duplicates = {k for k, n in counts.items() if n > 1}
    # only attempts in flight at node a when it died may be delivered twice
    assert all(m.startswith("<a-") for m, _ in duplicates), duplicates
    assert len(duplicates) <= in_flight_a
    taken_over = {(m, r) for m, r, helo in sink.delivered
                  if m.startswith("<a-") and helo != "node-a.test"}
    assert {r for _, r in taken_over} >= slow_a  # a's waiting items: delivered by b or c
    assert by_node["node-a.test"] >= 2 and by_node["node-b.test"] and by_node["node-c.test"]
    assert takeover >= LEASE - 1  # not before a's leases expired
    # the shared queue is empty, as any node's `tampu queue` sees it
    deadline = time.monotonic() + 10
    while True:
        listed = run_tampu("queue", "list", "--config-dir", str(b.root), env=b.env)
        if "queue is empty" in listed.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert "queue is empty" in listed.stdout, listed.stdout + listed.stderr
    status = run_tampu("db", "status", "--config-dir", str(c.root), env=c.env)
    assert "node a:" in status.stdout and "node b:" in status.stdout, status.stdout
    print(f"takeover of node a's items: {takeover:.1f}s; deliveries by node {dict(by_node)}; "
          f"{len(duplicates)} duplicate(s) of {in_flight_a} in flight")
