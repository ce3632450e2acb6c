"""The on-disk queue: durability format, recovery at start, the cap, and ``tampu queue``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tampu.caller import HookCaller, Hooks
from tampu.errors import QueueError, QueueFull
from tampu.queue import Queue, valid_id
from tampu.registry import new_plugin_manager
from tampu.testing import make_config_dir
from tests.recording import Recorder, fixed_port, send


def _queue(path: Path, max_items: int = 10) -> Queue:
    hooks = Hooks(HookCaller(new_plugin_manager(), {}, timeout=5))
    return Queue(path, hooks, max_items)


def _submit(queue: Queue, data: bytes = b"Subject: x\r\n\r\nbody\r\n", **kw: object):
    args = {"mail_from": "a@example.org", "recipients": ["b@example.test"], "data": data, **kw}
    return asyncio.run(queue.submit(**args))  # type: ignore[arg-type]


# ------------------------------------------------------------------------- format


def test_item_roundtrip_and_state(tmp_path):
    queue = _queue(tmp_path / "q")
    item = _submit(queue, recipients=["b@example.test", "c@example.test", "B@example.test"])
    assert valid_id(item.id) and queue.ids() == [item.id]
    assert [r.address for r in item.recipients] == ["b@example.test", "c@example.test"]
    raw = queue.item_path(item.id).read_bytes()
    header = json.loads(raw.split(b"\n", 1)[0])
    assert header["size"] == len(b"Subject: x\r\n\r\nbody\r\n")
    assert queue.read_message(item.id) == b"Subject: x\r\n\r\nbody\r\n"
    item.recipients[0].status = item.recipients[0].status.SENT
    item.attempts = 1
    item.extra["timed_out"] = ["c@example.test"]
    asyncio.run(queue.save_state(item))
    again = queue.load(item.id)
    assert [r.status.value for r in again.recipients] == ["sent", "pending"]
    assert again.attempts == 1 and again.extra["timed_out"] == ["c@example.test"]
    assert not any(p.name.startswith(".tmp-") for p in queue.dir.iterdir())


def test_save_state_after_delete_writes_nothing(tmp_path):
    queue = _queue(tmp_path / "q")
    item = _submit(queue)
    queue._remove_files(item.id)
    asyncio.run(queue.save_state(item))
    assert sorted(p.name for p in queue.dir.iterdir()) == ["corrupt"]


def test_cap_and_dsn_bypass(tmp_path):
    queue = _queue(tmp_path / "q", max_items=2)
    _submit(queue)
    _submit(queue)
    assert queue.full()
    with pytest.raises(QueueFull):
        _submit(queue)
    _submit(queue, mail_from="", origin="dsn", check_full=False)  # bounces are never refused
    assert queue.count() == 3


def test_retry_requests(tmp_path):
    queue = _queue(tmp_path / "q")
    queue.request_retry([])
    queue.request_retry(["abc123"])
    with pytest.raises(QueueError):
        queue.request_retry(["../../etc/passwd"])
    assert queue.take_retry_requests() == ["abc123", "all"]
    assert queue.take_retry_requests() == []


# ------------------------------------------------------------------------- recovery


def test_recovery_at_start(tampu_server, tmp_path, tampu_ca, caplog):
    caplog.set_level(logging.INFO, logger="tampu.queue")
    cdir = make_config_dir(tmp_path / "conf", ca=tampu_ca)
    queue = _queue(cdir / "data" / "queue")
    good = _submit(queue, recipients=["good@example.test"])
    truncated = _submit(queue, data=b"Subject: t\r\n\r\n" + b"x" * 1000)
    with open(queue.item_path(truncated.id), "r+b") as fh:  # lost its tail
        fh.truncate(queue.item_path(truncated.id).stat().st_size - 10)
    (queue.dir / "zzzzgarbage.item").write_bytes(b"\x00\x01 not json\n")
    half = queue.dir / ".tmp-aaaahalf.item"
    half.write_bytes(b'{"v":1,"id":"aaaahalf"')  # a crash mid-write...
    os.utime(half, (time.time() - 60, time.time() - 60))  # ...before this process started
    busy = queue.dir / ".tmp-bbbbbusy.item"  # a reception worker writing right now
    busy.write_bytes(b"{")
    (queue.dir / "orphan0.state").write_text("{}")
    queue.request_retry([])

    rec = Recorder()
    srv = tampu_server(config_dir=cdir, plugins=[rec], deliver=True)
    rec.wait_done(good.id)  # a corrupt neighbour is not fatal: the good item is delivered
    assert rec.attempts_for("good@example.test") == ["sent"]
    assert rec.attempts_for("b@example.test") == []
    names = sorted(p.name for p in queue.dir.iterdir())
    assert names == [".tmp-bbbbbusy.item", "corrupt", "retry"]  # old tmp, orphan state gone
    assert list((queue.dir / "retry").iterdir()) == []  # stale retry requests are cleared
    assert sorted(p.name for p in (queue.dir / "corrupt").iterdir()) == [
        f"{truncated.id}.item", "zzzzgarbage.item"]
    assert f"qid={truncated.id}: corrupt queue item" in caplog.text
    assert "qid=zzzzgarbage: corrupt queue item" in caplog.text
    assert "removing half-written queue file .tmp-aaaahalf.item" in caplog.text
    assert srv.queue_items() == []
    # an unreadable state file is not fatal either: the item resumes from its enqueue state
    again = _submit(queue, recipients=["late@example.test"])
    (queue.dir / f"{again.id}.state").write_text("{broken")
    assert queue.load(again.id).recipients[0].pending


# ------------------------------------------------------------------------- the cap


def test_queue_cap_answers_452(tampu_server):
    conf = {"10-cap.toml": "[server]\nmax_queue_items = 1\n"}
    srv = tampu_server(plugins=[Recorder()], deliver=False, conf=conf)
    with srv.smtp() as first:
        first.ehlo()
        assert first.mail("a@example.org")[0] == 250
        assert first.rcpt("b@example.test")[0] == 250
        send(srv, "c@example.org", ["d@example.test"])  # fills the queue meanwhile
        code, msg = first.data(b"Subject: x\r\n\r\nbody\r\n")
        assert (code, msg[:5]) == (452, b"4.3.1")  # checked again when it matters, at DATA
    with srv.smtp() as late:
        late.ehlo()
        code, msg = late.mail("a@example.org")
        assert (code, msg[:5]) == (452, b"4.3.1")  # and early, before a body is sent
    assert len(srv.queue_items()) == 1


# ------------------------------------------------------------------------- tampu queue


def _tampu(cdir: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tampu.cli", command, "--config-dir",
                           str(cdir), *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def mda_server(tmp_path):
    """A real ``tampu serve`` whose delivery_mda fails (75) until a flag file exists."""
    flag, out = tmp_path / "flag", tmp_path / "delivered"
    script = tmp_path / "mda.sh"
    script.write_text(f'#!/bin/sh\n[ -e {flag} ] || exit 75\ncat >> {out}\nexit 0\n')
    script.chmod(0o755)
    cdir = tmp_path / "conf"
    port = fixed_port()
    make_config_dir(cdir, base=textwrap.dedent(f"""\
        [server]
        hostname = "localhost"
        local_domains = ["example.test"]
        retry_schedule = [3600.0]
        shutdown_timeout = 1
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{port}"]
        [plugins.localusers]
        enabled = true
        [plugins.delivery_mda]
        enabled = true
        command = "{script}"
        args = []
        """), users={"user@example.test": "pw"})
    proc = subprocess.Popen([sys.executable, "-m", "tampu.cli", "serve", "--config-dir",
                             str(cdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not (cdir / "data" / "tampu.pid").exists() or not _listening(port):
            if proc.poll() is not None:
                assert proc.stdout is not None
                pytest.fail(f"tampu serve exited: {proc.stdout.read().decode()}")
            assert time.monotonic() < deadline, "tampu serve did not start"
            time.sleep(0.05)
        yield cdir, port, flag, out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _wait(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _smtp_send(port: int, subject: str) -> str:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        _, resp = c.ehlo("client.test")
        c.mail("sender@example.org")
        c.rcpt("user@example.test")
        code, msg = c.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        assert code == 250, msg
    return msg.decode().rpartition(" ")[2]


def test_cli_queue_list_show_retry_delete(mda_server):
    cdir, port, flag, out = mda_server
    qid = _smtp_send(port, "first one")
    qdir = cdir / "data" / "queue"
    _wait(lambda: (qdir / f"{qid}.state").exists())  # the first attempt failed (exit 75)

    listed = _tampu(cdir, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    assert qid in listed.stdout and "from=<sender@example.org>" in listed.stdout
    assert "<user@example.test>  pending  last error:" in listed.stdout

    shown = _tampu(cdir, "queue", "show", qid)
    assert shown.returncode == 0
    assert '"mail_from": "sender@example.org"' in shown.stdout
    assert "Subject: first one" in shown.stdout
    assert _tampu(cdir, "queue", "show", "nosuchid").returncode == 1

    flag.touch()
    retried = _tampu(cdir, "queue", "retry", qid)
    assert retried.returncode == 0, retried.stderr
    _wait(lambda: out.exists() and b"first one" in out.read_bytes())
    _wait(lambda: not (qdir / f"{qid}.item").exists())
    assert _tampu(cdir, "queue", "list").stdout.strip() == "queue is empty"

    flag.unlink()
    qid2 = _smtp_send(port, "second one")
    _wait(lambda: (qdir / f"{qid2}.state").exists())
    deleted = _tampu(cdir, "queue", "delete", qid2, "nosuchid")
    assert deleted.returncode == 1  # one of the two was unknown
    assert f"deleted {qid2}" in deleted.stdout
    _wait(lambda: not any(qdir.glob(f"{qid2}*")))
    flag.touch()
    assert _tampu(cdir, "queue", "retry").returncode == 0  # "all": nothing left to do
    time.sleep(0.3)
    assert b"second one" not in out.read_bytes()
    assert os.listdir(qdir / "retry") == []  # the server took the request


def test_cli_retry_without_server(tmp_path):
    cdir = make_config_dir(tmp_path / "conf")
    queue = _queue(cdir / "data" / "queue")
    item = _submit(queue)
    res = _tampu(cdir, "queue", "retry", item.id)
    assert res.returncode == 1 and "no running server" in res.stderr
    assert (queue.dir / "retry" / item.id).exists()  # taken at the next start
    assert _tampu(cdir, "queue", "retry", "../x").returncode == 1
