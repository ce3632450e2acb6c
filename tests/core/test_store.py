"""The filesystem queue store: durability format, recovery at start, the cap, operator
requests, and ``tampu queue``."""

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

from tampu import files, queue_recovery
from tampu.errors import QueueError
from tampu.item import QueueItem, Recipient, Route
from tampu.store import valid_id
from tampu.store_files import FilesystemStore
from tampu.testing import make_config_dir
from tests.helpers import smtp_conf
from tests.recording import Recorder, fixed_port, send


def _queue(path: Path, max_items: int = 10) -> FilesystemStore:
    return FilesystemStore(path, max_items)


def _submit(queue: FilesystemStore, data: bytes = b"Subject: x\r\n\r\nbody\r\n",
            recipients: list[str] | None = None, mail_from: str = "a@example.org",
            **kw: object) -> QueueItem:
    item = QueueItem(id=queue.new_id(), mail_from=mail_from,
                     recipients=[Recipient(r, r) for r in recipients or ["b@example.test"]],
                     **kw)  # type: ignore[arg-type]
    asyncio.run(queue.put(item, data))
    return item


# ------------------------------------------------------------------------- format


def test_item_roundtrip_and_state(tmp_path):
    queue = _queue(tmp_path / "q")
    item = _submit(queue, recipients=["b@example.test", "c@example.test"])
    item.recipients.append(Recipient("b@example.test", "alias@example.test",
                                     route=Route(pipe="cat")))
    asyncio.run(queue.save_state(item))
    assert valid_id(item.id) and queue.ids_now() == [item.id]
    raw = queue.item_path(item.id).read_bytes()
    header = json.loads(raw.split(b"\n", 1)[0])
    assert header["size"] == len(b"Subject: x\r\n\r\nbody\r\n")
    assert queue.read_message_now(item.id) == b"Subject: x\r\n\r\nbody\r\n"
    item.recipients[0].status = item.recipients[0].status.SENT
    item.attempts, item.held, item.next_attempt = 1, True, 1234.5
    item.extra["timed_out"] = ["c@example.test"]
    asyncio.run(queue.save_state(item))
    again = queue.load_now(item.id)
    assert [r.status.value for r in again.recipients] == ["sent", "pending"]
    assert again.attempts == 1 and again.extra["timed_out"] == ["c@example.test"]
    assert again.held and again.next_attempt == 1234.5
    assert not any(p.name.startswith(".tmp-") for p in queue.dir.iterdir())


def test_state_is_matched_by_address_and_route(tmp_path):
    queue = _queue(tmp_path / "q")
    item = QueueItem(id=queue.new_id(), mail_from="a@example.org", recipients=[
        Recipient("u@example.test", "list@example.test"),
        Recipient("u@example.test", "list@example.test", route=Route(pipe="archive"))])
    asyncio.run(queue.put(item, b"x\r\n"))
    item.recipients[1].status = item.recipients[1].status.SENT
    asyncio.run(queue.save_state(item))
    again = queue.load_now(item.id)
    assert [(r.route.pipe, r.status.value) for r in again.recipients] == [
        (None, "pending"), ("archive", "sent")]


def test_save_state_after_delete_writes_nothing(tmp_path):
    queue = _queue(tmp_path / "q")
    item = _submit(queue)
    queue.remove_now(item.id)
    asyncio.run(queue.save_state(item))
    asyncio.run(queue.close())  # its log segment is retired
    assert sorted(p.name for p in queue.dir.iterdir()) == ["corrupt", "log"]
    assert list((queue.dir / "log").iterdir()) == []


def test_failed_write_leaves_no_temporary_file(tmp_path):
    # A real failing write: the file size limit makes write(2) fail half-way (EFBIG), as a
    # full disk does with ENOSPC; in a child process, so that the limit stays there.
    script = textwrap.dedent(f"""
        import asyncio, resource, signal
        from pathlib import Path
        from tampu.item import QueueItem, Recipient
        from tampu.store_files import FilesystemStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = FilesystemStore(Path({str(tmp_path / "q")!r}), 10)
        store.prepare()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        item = QueueItem(id=store.new_id(), mail_from="a@x.test",
                         recipients=[Recipient("b@x.test", "b@x.test")])
        try:
            asyncio.run(store.put(item, b"x" * 100_000))
        except OSError as exc:
            print("failed:", exc.errno)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.startswith("failed:"), out.stdout + out.stderr
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["corrupt", "log"]


def test_cap(tmp_path):
    queue = _queue(tmp_path / "q", max_items=2)
    _submit(queue)
    assert not queue.full()
    _submit(queue)
    assert queue.full()
    assert queue.count() == 2


def test_operator_requests(tmp_path):
    queue = _queue(tmp_path / "q")
    asyncio.run(queue.request("retry", []))
    asyncio.run(queue.request("hold", ["abc123"]))
    with pytest.raises(QueueError):
        asyncio.run(queue.request("retry", ["../../etc/passwd"]))
    with pytest.raises(QueueError):
        asyncio.run(queue.request("explode", ["abc123"]))
    assert sorted(asyncio.run(queue.take_requests())) == [("hold", "abc123"),
                                                           ("retry", "all")]
    assert asyncio.run(queue.take_requests()) == []


# ------------------------------------------------------------------------- recovery


def test_recovery_at_start(tampu_server, tmp_path, tampu_ca, caplog):
    caplog.set_level(logging.INFO, logger="tampu.queue")
    cdir = make_config_dir(tmp_path / "conf", ca=tampu_ca)
    queue = _queue(cdir / "data" / "queue")
    good = _submit(queue, recipients=["good@example.test"])
    truncated = _submit(queue, data=b"Subject: t\r\n\r\n" + b"x" * 1000)
    asyncio.run(queue.close())  # the log segment of this process goes (its items are filed)
    with open(queue.item_path(truncated.id), "r+b") as fh:  # lost its tail
        fh.truncate(queue.item_path(truncated.id).stat().st_size - 10)
    (queue.dir / "zzzzgarbage.item").write_bytes(b"\x00\x01 not json\n")
    half = queue.dir / ".tmp-aaaahalf.item"
    half.write_bytes(b'{"v":1,"id":"aaaahalf"')  # a crash mid-write...
    # ...before this process started (however long ago the test run imported the store)
    before = queue_recovery._PROCESS_START - 60
    os.utime(half, (before, before))
    busy = queue.dir / ".tmp-bbbbbusy.item"  # a reception worker writing right now
    busy.write_bytes(b"{")
    (queue.dir / "orphan0.state").write_text("{}")

    rec = Recorder()
    srv = tampu_server(config_dir=cdir, plugins=[rec], deliver=True)
    rec.wait_done(good.id)  # a corrupt neighbour is not fatal: the good item is delivered
    assert rec.attempts_for("good@example.test") == ["sent"]
    assert rec.attempts_for("b@example.test") == []
    deadline = time.monotonic() + 10  # corrupt items are set aside as the feeder loads them
    while len(list((queue.dir / "corrupt").iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    names = sorted(p.name for p in queue.dir.iterdir())
    assert names == [".tmp-bbbbbusy.item", "corrupt", "log"]  # old tmp, orphan state gone
    assert sorted(p.name for p in (queue.dir / "corrupt").iterdir()) == [
        f"{truncated.id}.item", "zzzzgarbage.item"]
    assert f"qid={truncated.id}: corrupt queue item" in caplog.text
    assert "qid=zzzzgarbage: corrupt queue item" in caplog.text
    assert "removing half-written queue file .tmp-aaaahalf.item" in caplog.text
    assert srv.queue_items() == []
    # an unreadable state file is not fatal either: the item resumes from its enqueue state
    again = _submit(queue, recipients=["late@example.test"])
    (queue.dir / f"{again.id}.state").write_text("{broken")
    assert queue.load_now(again.id).recipients[0].pending


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
    make_config_dir(cdir, base=smtp_conf(port, "retry_schedule = [3600.0]\n", f"""\
        [plugins.delivery_mda]
        enabled = true
        command = "{script}"
        args = []
        """, shutdown_timeout=1), users={"user@example.test": "pw"})
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
    assert qid in listed.stdout and "<sender@example.org>" in listed.stdout
    assert "<user@example.test>  pending  (MDA" in listed.stdout
    assert "next attempt 20" in listed.stdout and "in 1 item(s)" in listed.stdout
    as_json = [json.loads(line) for line in _tampu(cdir, "queue", "list", "--json")
               .stdout.splitlines()]
    assert as_json[0]["queue_id"] == qid and as_json[0]["sender"] == "sender@example.org"
    assert as_json[0]["recipients"][0]["status"] == "pending"

    shown = _tampu(cdir, "queue", "show", qid)
    assert shown.returncode == 0
    assert '"mail_from": "sender@example.org"' in shown.stdout
    assert "Subject: first one" in shown.stdout
    headers = _tampu(cdir, "queue", "show", qid, "--headers").stdout
    assert "Subject: first one" in headers and "body" not in headers
    assert _tampu(cdir, "queue", "show", qid, "--body").stdout.strip() == "body"
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
    held = _tampu(cdir, "queue", "hold", qid2)
    assert held.returncode == 0, held.stderr
    _wait(lambda: "!" in _tampu(cdir, "queue", "list").stdout.split()[0])
    flag.touch()
    assert _tampu(cdir, "queue", "retry", qid2).returncode == 0
    time.sleep(0.5)
    assert b"second one" not in out.read_bytes()  # held: not delivered
    flag.unlink()
    assert _tampu(cdir, "queue", "delete", qid2, "nosuchid").returncode == 1  # unknown ID
    deleted = _tampu(cdir, "queue", "delete", qid2)
    assert deleted.returncode == 0 and "delete" in deleted.stdout
    _wait(lambda: not any(qdir.glob(f"{qid2}*")))
    flag.touch()
    assert _tampu(cdir, "queue", "flush").returncode == 0  # "all": nothing left to do
    time.sleep(0.3)
    assert b"second one" not in out.read_bytes()
    assert os.listdir(qdir / "requests") == []  # the server took every request


@pytest.mark.skipif(not files.HAVE_SYNCFS, reason="the queue log needs syncfs (Linux)")
def test_cli_lists_items_that_are_only_in_a_running_servers_log(tmp_path):
    """A new item has no file until it outlives its log record: ``tampu queue`` reads the
    log segments of the running processes too, and stops listing it once it is gone."""
    cdir = make_config_dir(tmp_path / "conf")
    queue = _queue(cdir / "data" / "queue")  # this process is the running server
    item = _submit(queue, recipients=["x@far.test"])
    assert not queue.item_path(item.id).exists()
    listed = _tampu(cdir, "queue", "list")
    assert listed.returncode == 0 and item.id in listed.stdout and "x@far.test" in \
        listed.stdout, listed.stdout + listed.stderr
    shown = _tampu(cdir, "queue", "show", item.id)
    assert shown.returncode == 0 and "Subject: x" in shown.stdout, shown.stdout + shown.stderr
    observer = FilesystemStore(queue.dir, 10)  # another process's view, as the CLI's
    assert observer.ids_now() == [item.id] and observer.count() == 1
    assert observer.read_message_now(item.id) == b"Subject: x\r\n\r\nbody\r\n"
    asyncio.run(queue.remove(item))  # delivered: a D record
    assert _tampu(cdir, "queue", "list").stdout.strip() == "queue is empty"
    assert FilesystemStore(queue.dir, 10).ids_now() == []
    asyncio.run(queue.close())


def test_cli_without_server(tmp_path):
    cdir = make_config_dir(tmp_path / "conf")
    queue = _queue(cdir / "data" / "queue")
    item = _submit(queue)
    other = _submit(queue, recipients=["x@far.test"])
    asyncio.run(queue.close())  # as a server that stopped: the items are in their files
    res = _tampu(cdir, "queue", "retry", item.id)
    assert res.returncode == 0 and "no running server" in res.stdout
    assert _tampu(cdir, "queue", "retry", "../x").returncode == 1
    assert _tampu(cdir, "queue", "hold", item.id).returncode == 0
    assert queue.load_now(item.id).held  # applied to the store at once
    res = _tampu(cdir, "queue", "delete", "--domain", "FAR.test")
    assert res.returncode == 0, res.stderr
    assert queue.ids_now() == [item.id] and other.id not in queue.ids_now()
    assert _tampu(cdir, "queue", "delete", "ALL").returncode == 0
    assert queue.ids_now() == []
