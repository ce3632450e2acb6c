"""Crash safety: SIGKILL a real ``tampu serve`` while mail flows; nothing acknowledged is lost.

A client thread sends numbered messages; the test kills the server at random moments (5
times), restarting it each time on the same configuration and data directory. At the end
every message that got ``250`` must be in the recipient's Maildir at least once (twice is
allowed: a crash between delivery and writing the result repeats a delivery).
"""

from __future__ import annotations

import random
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tampu.testing import make_config_dir
from tests.helpers import maildir_conf
from tests.recording import fixed_port

KILLS = 5
MAX_MESSAGES = 200
SUBJECT_RE = re.compile(rb"^Subject: crash-test-(\d+)$", re.M)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class ServerProcess:
    """``tampu serve`` in a subprocess; started, killed and stopped by its PID only."""

    def __init__(self, cdir: Path, port: int, log: Path) -> None:
        self.cdir, self.port, self.log = cdir, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tampu.cli", "serve", "--config-dir", str(self.cdir)],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not _listening(self.port):
            if self.proc.poll() is not None:
                pytest.fail(f"tampu serve exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("tampu serve did not start listening within 15 s")
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown, no flushing, no cleanup
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _sender(port: int, acked: list[int], stop: threading.Event) -> None:
    for n in range(MAX_MESSAGES):
        if stop.is_set():
            return
        body = (f"From: <sender@example.org>\r\nSubject: crash-test-{n}\r\n"
                f"Message-ID: <crash-test-{n}@client.test>\r\n\r\nmessage {n}\r\n").encode()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5,
                              local_hostname="client.test") as client:
                client.sendmail("sender@example.org", ["user@example.test"], body)
            acked.append(n)  # sendmail returned: the server said 250 to DATA
        except (smtplib.SMTPException, OSError):
            time.sleep(0.05)  # the server is down or was killed mid-transaction


def _delivered(maildir: Path) -> list[int]:
    found = []
    for sub in ("new", "cur"):
        folder = maildir / sub
        if folder.is_dir():
            for path in folder.iterdir():
                found += [int(m) for m in SUBJECT_RE.findall(path.read_bytes())]
    return found


def test_sigkill_loses_no_acknowledged_message(tmp_path):
    port = fixed_port()
    cdir = make_config_dir(tmp_path / "conf", base=maildir_conf(
        port, 'retry_schedule = [0.5]\nlog_level = "warning"\n', shutdown_timeout=1),
        users={"user@example.test": "pw"})
    queue = cdir / "data" / "queue"
    maildir = cdir / "data" / "mail" / "example.test" / "user"
    server = ServerProcess(cdir, port, tmp_path / "server.log")
    rng = random.Random()
    acked: list[int] = []
    stop = threading.Event()
    client = threading.Thread(target=_sender, args=(port, acked, stop), daemon=True)
    started = time.monotonic()
    try:
        server.start()
        client.start()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.3, 1.2))
            server.kill()
            time.sleep(rng.uniform(0.0, 0.2))
            server.start()
        stop.set()
        client.join(15)
        assert not client.is_alive()
        deadline = time.monotonic() + 15  # let the last server finish what is queued
        while any(queue.glob("*.item")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        server.stop()
    assert not any(queue.glob("*.item")), "the queue did not drain after the last restart"
    delivered = _delivered(maildir)
    assert len(acked) >= 10, f"only {len(acked)} messages acknowledged; the test proves little"
    lost = sorted(set(acked) - set(delivered))
    assert not lost, f"acknowledged but never delivered: {lost}"
    print(f"acked={len(acked)} delivered={len(delivered)} distinct={len(set(delivered))}")
    assert time.monotonic() - started < 40
