"""``[server] workers``: several reception processes share the listener (SO_REUSEPORT).

A real ``tampu serve`` with three processes; many short connections are spread over them; every
accepted message is delivered (each process delivers what it accepted; items that wait for a
retry go to the main process); SIGTERM to the main process stops all of them.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tampu.testing import make_config_dir
from tests.helpers import maildir_conf, serving, smtp_conf
from tests.recording import fixed_port

MESSAGES = 60
QID_RE = re.compile(rb"Queued as ([a-z0-9]+)")


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return {int(p) for p in out.split()}


def test_workers_share_the_listener_and_every_message_is_delivered(tmp_path):
    port = fixed_port()
    cdir = make_config_dir(tmp_path / "conf", users={"user@example.test": "pw"},
                           base=maildir_conf(port, 'workers = 3\nretry_schedule = [0.5]\n'
                                                   'log_level = "info"\n'))
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


# ------------------------------------------------------------------ who delivers what

def mda_conf(port: int, script: str) -> str:
    """Two workers delivering with delivery_mda: ``/bin/sh -c script``."""
    return smtp_conf(port, 'workers = 2\nretry_schedule = [0.5]\nlog_level = "info"\n', f"""\
        [plugins.delivery_maildir]
        enabled = false
        [plugins.delivery_mda]
        enabled = true
        command = "/bin/sh"
        args = ["-c", '{script}', "mda"]
        """)


def _mda_server(tmp_path: Path, script: str) -> tuple[Path, int]:
    port = fixed_port()
    cdir = make_config_dir(tmp_path / "conf", users={"user@example.test": "pw"},
                           base=mda_conf(port, script))
    return cdir, port


def _send_many(port: int, count: int, tag: str) -> list[str]:
    def send(n: int) -> str:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("client.test")
            client.mail("sender@example.org")
            client.rcpt("user@example.test")
            code, reply = client.data(f"Subject: {tag}-{n}\r\n\r\nbody {n}\r\n".encode())
            assert code == 250, reply
            return QID_RE.search(reply).group(1).decode()  # type: ignore[union-attr]

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(send, range(count)))


def _wait(predicate: Callable[[], object], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_each_process_delivers_its_own_and_waiting_items_go_to_the_main_one(tmp_path):
    """First rounds are made by the process that received the message; a message that must
    wait for a retry is handed to the main process, which makes the next round."""
    out, fail = tmp_path / "out", tmp_path / "fail"
    out.mkdir()
    fail.touch()
    # the MDA notes which process ran it ($PPID), fails (75: temporary) while FAIL exists
    script = (f'echo $PPID >> {tmp_path}/attempts; [ -e {fail} ] && exit 75; '
              f'cat > {out}/msg.$$; echo $PPID > {out}/by.$$')
    cdir, port = _mda_server(tmp_path, script)
    with serving(cdir, port) as (proc, log):
        (worker,) = _children(proc.pid)
        qids = _send_many(port, 16, "handover")
        attempts = tmp_path / "attempts"
        _wait(lambda: attempts.exists() and len(attempts.read_text().split()) >= 16, 20,
              "a first attempt of each message")
        first = attempts.read_text().split()
        assert set(first) == {str(proc.pid), str(worker)}, \
            "both processes made first rounds (each of what it received)"
        fail.unlink()
        _wait(lambda: len(list(out.glob("msg.*"))) == 16, 20, "every message delivered")
        finishers = {p.read_text().strip() for p in out.glob("by.*")}
        assert finishers == {str(proc.pid)}, "the retries were made by the main process"
        queue = cdir / "data" / "queue"
        _wait(lambda: not any(queue.glob("*.item")), 10, "an empty queue")
        assert len(set(qids)) == 16
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()[-2000:]


def test_the_main_process_takes_over_the_items_of_a_worker_that_died(tmp_path):
    """A worker killed in the middle of its deliveries: the main process delivers its items
    (again: the worker's attempts never reported), and goes on serving."""
    out, hold = tmp_path / "out", tmp_path / "hold"
    out.mkdir()
    hold.touch()
    script = (f'cat > {out}/msg.$$; echo $PPID > {out}/by.$$; '
              f'while [ -e {hold} ]; do sleep 0.05; done')
    cdir, port = _mda_server(tmp_path, script)
    with serving(cdir, port) as (proc, log):
        (worker,) = _children(proc.pid)
        _send_many(port, 12, "takeover")
        _wait(lambda: len(list(out.glob("by.*"))) == 12, 20, "every first attempt under way")
        by_worker = [p for p in out.glob("by.*") if p.read_text().strip() == str(worker)]
        assert by_worker, "the worker received (and delivers) some of the messages"
        os.kill(worker, signal.SIGKILL)
        _wait(lambda: f"reception worker (pid {worker}) ended" in log.read_text(), 10,
              "the main process to notice")
        hold.unlink()  # every MDA finishes now; the worker's results are lost with it
        _wait(lambda: len(list(out.glob("by.*"))) == 12 + len(by_worker), 20,
              "the worker's items delivered again by the main process")
        again = [p for p in out.glob("by.*") if p not in by_worker
                 and p.read_text().strip() == str(proc.pid)]
        assert len(again) >= len(by_worker)
        queue = cdir / "data" / "queue"
        _wait(lambda: not any(queue.glob("*.item")), 10, "an empty queue")
        _send_many(port, 2, "after")  # the main process still serves
        _wait(lambda: not any(queue.glob("*.item")), 10, "an empty queue again")
        _wait(lambda: not list((queue / "log").glob("*.seg")) or all(
            str(worker) not in p.name for p in (queue / "log").glob("*.seg")), 10,
            "the dead worker's log segment retired by the main process")
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()[-2000:]
