"""A queue write that fails for real (the file size limit, as a full disk does) in a running
``tampu serve``: the client gets a temporary failure, no ``.tmp-*`` file stays behind, and the
server goes on taking mail that fits."""

from __future__ import annotations

import resource
import signal
import smtplib
import subprocess
import sys
import time

from tampu.testing import make_config_dir
from tests.helpers import maildir_conf
from tests.load_kit import wait_until
from tests.recording import fixed_port

LIMIT = 64 * 1024


def _limit_file_size() -> None:  # in the child, before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write(2) fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _send(port: int, body: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        client.mail("sender@example.org")
        client.rcpt("user@example.test")
        return client.data(body)


def test_a_failed_queue_write_leaves_no_temporary_file(tmp_path):
    port = fixed_port()
    cdir = make_config_dir(tmp_path / "conf", base=maildir_conf(port, shutdown_timeout=1),
                           users={"user@example.test": "pw"})
    queue = cdir / "data" / "queue"
    proc = subprocess.Popen([sys.executable, "-m", "tampu.cli", "serve", "--config-dir",
                             str(cdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_limit_file_size)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                code, msg = _send(port, b"Subject: small\r\n\r\nfits\r\n")
                break
            except OSError:
                assert proc.poll() is None, "tampu serve exited"
                assert time.monotonic() < deadline, "tampu serve did not start"
                time.sleep(0.05)
        assert code == 250, msg

        big = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * (2 * LIMIT // 78)
        code, msg = _send(port, big)
        assert code == 451 and msg.startswith(b"4."), (code, msg)
        assert [p.name for p in queue.iterdir() if p.name.startswith(".tmp-")] == []

        code, msg = _send(port, b"Subject: small again\r\n\r\nstill fits\r\n")
        assert code == 250, msg  # the server is fine
        maildir = cdir / "data" / "mail" / "example.test" / "user" / "new"
        wait_until(lambda: maildir.is_dir() and len(list(maildir.iterdir())) == 2, 10,
                   "both small messages in the Maildir")
        wait_until(lambda: sorted(p.name for p in queue.iterdir()) == ["corrupt", "log"]
                   and list((queue / "log").iterdir()) == [], 10,
                   "the queue to be empty, without a temporary file")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
