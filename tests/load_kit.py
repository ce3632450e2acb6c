"""Helpers for the outbound load tests: a receiving SMTP server that counts its simultaneous
connections, a queue filled with thousands of items, and a real ``tampu serve`` process
whose time to its first completed transaction is measured."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from tampu.item import QueueItem, Recipient
from tampu.store_files import FilesystemStore
from tests.plugins.remote_kit import SinkController


@dataclass
class Counts:
    """What a :class:`CountingSink` saw (updated in its thread; read with ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    open: int = 0
    peak: int = 0
    connections: int = 0
    transactions: int = 0
    recipients: int = 0
    rsets: int = 0
    per_transaction: list[int] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)


class _CountingSMTP(SMTP):
    def __init__(self, *args: Any, counts: Counts, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts = counts

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # not the TLS transport replacing the first one
        super().connection_made(transport)
        if first:
            with self.counts.lock:
                self.counts.open += 1
                self.counts.connections += 1
                self.counts.peak = max(self.counts.peak, self.counts.open)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        with self.counts.lock:
            self.counts.open -= 1

    async def smtp_RSET(self, arg: str) -> None:
        with self.counts.lock:
            self.counts.rsets += 1
        await super().smtp_RSET(arg)


class _Handler:
    def __init__(self, counts: Counts, delay: float) -> None:
        self.counts = counts
        self.delay = delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.counts.lock:
            self.counts.transactions += 1
            self.counts.recipients += len(envelope.rcpt_tos)
            self.counts.per_transaction.append(len(envelope.rcpt_tos))
            self.counts.rcpts.extend(envelope.rcpt_tos)
        return "250 2.0.0 Stored"


class CountingSink(SinkController):
    """An SMTP server on ``host:port`` that counts simultaneous connections (``counts.peak``)
    and transactions; each DATA takes ``delay`` seconds, so that deliveries overlap."""

    def __init__(self, host: str, port: int, *, delay: float = 0.0) -> None:
        self.counts = Counts()
        super().__init__(_Handler(self.counts, delay), hostname=host, port=port,
                         server_hostname=f"sink-{host}", ready_timeout=10)

    def factory(self) -> Any:
        smtp = _CountingSMTP(self.handler, counts=self.counts, **self.SMTP_kwargs)
        self.sessions.append(smtp)
        return smtp

    def __enter__(self) -> CountingSink:
        self.start()
        with self.counts.lock:  # aiosmtpd's own probe connection at start is not tampu's
            self.counts.peak = self.counts.open
            self.counts.connections = 0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def fill_queue(queue_dir: Path, count: int, rcpts: list[str], *, size: int = 2000,
               auth_user: str | None = "user@example.test") -> list[str]:
    """Write ``count`` items as a server that stopped would have left them (no fsync: the
    files are the same). Returns their IDs."""
    store = FilesystemStore(queue_dir, count + 1000, fsync=False)
    store.prepare()
    line = b"x" * 76 + b"\r\n"
    body = b"From: <user@example.test>\r\nSubject: load\r\n\r\n" + line * (size // 78 + 1)
    ids = []

    async def put_all() -> None:
        for _ in range(count):
            item = QueueItem(id=store.new_id(), mail_from="user@example.test",
                             recipients=[Recipient(r, r) for r in rcpts], auth_user=auth_user)
            await store.put(item, body)
            ids.append(item.id)

    asyncio.run(put_all())
    return ids


@dataclass
class Start:
    """Times after the ``tampu serve`` process was started."""

    greeting: float
    first_transaction: float
    queue_id: str


def first_transaction(port: int, started: float, rcpt: str, *, limit: float = 60.0) -> Start:
    """Connect as soon as the port accepts, send one message; when it got its greeting and
    its ``250`` after DATA, counted from ``started`` (time.monotonic())."""
    deadline = started + limit
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=0.2)
            break
        except OSError:
            assert time.monotonic() < deadline, "tampu serve did not listen"
            time.sleep(0.01)
    sock.close()
    client = smtplib.SMTP(timeout=limit)
    try:
        client.connect("127.0.0.1", port)
        greeting = time.monotonic() - started
        client.ehlo("client.test")
        code, msg = client.mail("sender@example.org")
        assert code == 250, msg
        code, msg = client.rcpt(rcpt)
        assert code == 250, msg
        code, msg = client.data(b"Subject: first after restart\r\n\r\nhello\r\n")
        assert code == 250, msg
        done = time.monotonic() - started
        client.quit()
    finally:
        client.close()
    return Start(greeting, done, msg.decode().rpartition(" ")[2])


@contextlib.contextmanager
def tampu_serve(config_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """``tampu serve`` in its own process (uvloop, as in production); yields it and the
    monotonic time it was started. Stopped with SIGTERM (bounded) at the end."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    log = open(config_dir / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "tampu.cli", "serve", "--config-dir",
                             str(config_dir)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc, started
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_until(predicate: Any, timeout: float, what: str) -> None:  # noqa: ANN401
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
