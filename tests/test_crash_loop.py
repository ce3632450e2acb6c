"""kill -9 under load: a real ``tampu serve`` (``workers = 1``, then ``workers = 2``) is killed
with SIGKILL 16 times per mode (32 in all) while several clients send at once, and started
again on the same data directory each time. At the end every message that got ``250`` is in
the recipient's Maildir; duplicates (a crash between a delivery and the item's removal
repeats the delivery) are counted and reported. With two processes some kills take a
reception worker alone first: the main process then delivers its items.

After the last, graceful stop the queue is empty: no item, no ``.done`` file, no log
segment (the store's final checkpoint retires its own; each start retired the killed ones).
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tampu.testing import make_config_dir
from tests.helpers import maildir_conf
from tests.recording import fixed_port
from tests.test_crash import ServerProcess

KILLS = 16
SENDERS = 6
SUBJECT_RE = re.compile(rb"^Subject: crash-loop-(\d+)$", re.M)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X")


class Load:
    """SENDERS threads sending numbered messages, each on a new connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.numbers = itertools.count()
        self.acked: list[int] = []
        self.refused = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True)
                        for _ in range(SENDERS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        while not self.stop.is_set():
            n = next(self.numbers)
            body = (f"From: <sender@example.org>\r\nSubject: crash-loop-{n}\r\n"
                    f"Message-ID: <crash-loop-{n}@client.test>\r\n\r\nmessage {n}\r\n").encode()
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5,
                                  local_hostname="client.test") as client:
                    client.sendmail("sender@example.org", ["user@example.test"], body)
                self.acked.append(n)  # the server said 250 to the end of DATA
            except (smtplib.SMTPException, OSError):
                self.refused += 1
                time.sleep(0.05)  # down, or killed mid-transaction

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)
            assert not thread.is_alive()


def _delivered(maildir: Path) -> list[int]:
    found = []
    for sub in ("new", "cur"):
        folder = maildir / sub
        if folder.is_dir():
            for path in folder.iterdir():
                found += [int(m) for m in SUBJECT_RE.findall(path.read_bytes())]
    return found


def _kill_all(server: ServerProcess) -> None:
    """SIGKILL the main process and its workers at once, by PID; wait until all are gone."""
    assert server.proc is not None
    pids = [server.proc.pid, *_children(server.proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(10)
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, "killed processes did not go away"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill9_loop_under_load(tmp_path, workers):
    port = fixed_port()
    cdir = make_config_dir(tmp_path / "conf", base=maildir_conf(
        port, f'retry_schedule = [0.5]\nlog_level = "warning"\nworkers = {workers}\n',
        shutdown_timeout=1), users={"user@example.test": "pw"})
    queue = cdir / "data" / "queue"
    maildir = cdir / "data" / "mail" / "example.test" / "user"
    server = ServerProcess(cdir, port, tmp_path / "server.log")
    rng = random.Random()
    load = Load(port)
    started = time.monotonic()
    worker_kills = 0
    try:
        server.start()
        load.start()
        for cycle in range(KILLS):
            time.sleep(rng.uniform(0.2, 0.7))
            assert server.proc is not None
            if workers > 1 and cycle % 4 == 1:  # a worker alone: the main process takes over
                for pid in _children(server.proc.pid)[:1]:
                    os.kill(pid, signal.SIGKILL)
                    worker_kills += 1
                time.sleep(rng.uniform(0.2, 0.5))
            _kill_all(server)
            time.sleep(rng.uniform(0.0, 0.1))
            server.start()
        time.sleep(0.5)
        load.finish()
        deadline = time.monotonic() + 20  # the last server delivers what is queued
        while time.monotonic() < deadline and (
                any(queue.glob("*.item")) or not set(load.acked) <= set(_delivered(maildir))):
            time.sleep(0.1)
    finally:
        load.stop.set()
        tree = [server.proc.pid, *_children(server.proc.pid)] if server.proc else []
        server.stop()
        deadline = time.monotonic() + 20
        while not all(_gone(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
    delivered = _delivered(maildir)
    acked = set(load.acked)
    lost = sorted(acked - set(delivered))
    duplicates = len(delivered) - len(set(delivered))
    report = (f"workers={workers}: {KILLS} kills ({worker_kills} of a worker alone), "
              f"{len(acked)} acknowledged, {len(delivered)} delivered, {duplicates} "
              f"duplicate(s), {load.refused} refused or cut, {time.monotonic() - started:.1f}s")
    print(report)
    assert len(acked) >= 100, f"only {len(acked)} messages acknowledged: {report}"
    assert not lost, f"acknowledged but never delivered: {lost[:20]} ({report})"
    assert not list(queue.glob("*.item")), "the queue did not drain after the last restart"
    leftovers = [p.name for p in queue.iterdir() if p.is_file()]
    assert leftovers == [], f"left in the queue after a graceful stop: {leftovers}"
    segments = [p.name for p in (queue / "log").iterdir()]
    assert segments == [], (f"log segments left after a graceful stop of {tree}: {segments}\n"
                            + server.log.read_text()[-3000:])
    assert duplicates <= KILLS * (SENDERS + 2), report
    assert time.monotonic() - started < 60, report
