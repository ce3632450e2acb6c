"""``[server] workers``: several reception processes share the listener (SO_REUSEPORT).

A real ``tampu serve`` with three processes; many short connections are spread over them; every
accepted message is delivered (the workers hand their new items to the main process, which
runs the delivery loop); SIGTERM to the main process stops all of them.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tampu.testing import make_config_dir
from tests.helpers import serving
from tests.recording import fixed_port

MESSAGES = 60
QID_RE = re.compile(rb"Queued as ([a-z0-9]+)")


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return {int(p) for p in out.split()}


def test_workers_share_the_listener_and_every_message_is_delivered(tmp_path):
    port = fixed_port()
    cdir = make_config_dir(tmp_path / "conf", users={"user@example.test": "pw"}, base=(
        textwrap.dedent(f"""\
        [server]
        hostname = "localhost"
        local_domains = ["example.test"]
        workers = 3
        retry_schedule = [0.5]
        shutdown_timeout = 2
        log_level = "info"
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{port}"]
        [plugins.localusers]
        enabled = true
        [plugins.delivery_maildir]
        enabled = true
        """)))
    with serving(cdir, port) as (proc, log):
        workers = _children(proc.pid)
        assert len(workers) == 2, f"expected 2 reception workers, found {workers}"

        def send(n: int) -> bytes:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.ehlo("client.test")
                client.mail("sender@example.org")
                client.rcpt("user@example.test")
                code, reply = client.data(f"Subject: worker-test-{n}\r\n\r\nbody {n}\r\n".encode())
                assert code == 250, reply
                return reply

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(send, range(MESSAGES)))
        qids = {QID_RE.search(r).group(1) for r in replies}
        assert len(qids) == MESSAGES  # queue IDs are unique across processes

        maildir = cdir / "data" / "mail" / "example.test" / "user" / "new"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if maildir.is_dir() and len(os.listdir(maildir)) >= MESSAGES:
                break
            time.sleep(0.1)
        subjects = {re.search(rb"Subject: worker-test-(\d+)", (maildir / f).read_bytes())
                    .group(1) for f in os.listdir(maildir)}
        assert subjects == {str(n).encode() for n in range(MESSAGES)}
        queue_dir = cdir / "data" / "queue"

        def queued() -> list[Path]:
            return [p for p in queue_dir.iterdir() if p.name.endswith(".item")]

        while queued() and time.monotonic() < deadline + 10:  # removal follows delivery
            time.sleep(0.1)
        assert not queued()

        # The connections were spread over the processes: several logged transactions.
        receivers = set(re.findall(r"tampu\[(\d+)\] INFO tampu\.smtp: session=\d+ qid=",
                                   log.read_text()))
        assert len(receivers) >= 2, f"all mail was received by one process: {receivers}"
        assert receivers <= {str(p) for p in workers | {proc.pid}}
        proc.terminate()
        code = proc.wait(30)
    assert code == 0, log.read_text()[-2000:]
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"worker {pid} still runs"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_workers_end_when_the_main_process_is_killed(tmp_path):
    port = fixed_port()
    cdir = make_config_dir(tmp_path / "conf", base=textwrap.dedent(f"""\
        [server]
        local_domains = ["example.test"]
        workers = 3
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{port}"]
        """))
    with serving(cdir, port) as (proc, _log):
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()  # SIGKILL: no chance to stop the workers itself
        proc.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "orphan workers still run"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _zombie(pid)
