"""``sendmail`` into a running server over its local socket: the real command, real sessions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tampu.testing import make_config_dir, server_toml

USER = "user@example.test"


def sendmail(config_dir: Path, *args: str, message: bytes,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    command = [str(Path(sys.executable).parent / "sendmail"), "--config-dir",
               str(config_dir), *args]
    return subprocess.run(command, input=message, capture_output=True, timeout=60,
                          env={**os.environ, **(env or {})}, check=False)


def test_cron_mail_is_delivered_with_its_local_user(tampu_server):
    srv = tampu_server(users={USER: "secret"}, capture=True)
    done = sendmail(srv.config_dir, "-t", "-F", "Cron Daemon", message=(
        b"To: user\nBcc: other@remote.test\nSubject: backup\n\nall good\n.\nnot this\n"))
    assert done.returncode == 0, done.stderr
    local = srv.capture.wait_delivered(USER)
    assert local.origin == "local"
    remote = srv.capture.wait_delivered("other@remote.test")  # local programs may relay
    assert remote.qid == local.qid
    msg = local.parsed()
    login = os.environ.get("USER") or "root"
    assert msg["From"] == f"Cron Daemon <{login}@example.test>"
    assert msg["Bcc"] is None and msg["Date"] and msg["Message-ID"]
    assert f"from local user {login}" in msg["Received"]
    assert msg.get_content().strip() == "all good"  # -t without -i: a lone dot ends it
    assert local.mail_from == f"{login}@example.test"


def test_sender_and_refusals_have_sendmail_exit_codes(tampu_server):
    srv = tampu_server(users={USER: "secret"}, capture=True)
    done = sendmail(srv.config_dir, "-f", "backup@example.test", "-i", USER,
                    message=b"Subject: x\n\n.\nstill the body\n")
    assert done.returncode == 0, done.stderr
    got = srv.capture.wait_delivered(USER)
    assert got.mail_from == "backup@example.test"
    assert b".\r\nstill the body" in got.message  # -i: the dot is text
    nobody = sendmail(srv.config_dir, "nobody@example.test", message=b"Subject: x\n\nx\n")
    assert nobody.returncode == 67, nobody.stderr  # EX_NOUSER
    assert b"550 5.1.1" in nobody.stderr
    usage = sendmail(srv.config_dir, "-bs", message=b"")
    assert usage.returncode == 64


def test_no_server_is_a_temporary_failure(tmp_path):
    root = make_config_dir(tmp_path / "conf", base=server_toml())
    done = sendmail(root, USER, message=b"Subject: x\n\nx\n")
    assert done.returncode == 75  # EX_TEMPFAIL: cron reports it, nothing is half-sent
    assert b"not running" in done.stderr


def test_the_socket_is_open_to_local_users_and_gone_after_stop(tampu_server):
    srv = tampu_server(users={USER: "secret"})
    path = srv.server.config.data_dir / "sendmail.sock"
    assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o666
    srv.stop()
    assert not path.exists()


def test_smtp_on_the_local_socket_offers_no_auth_and_no_starttls(tampu_server):
    import socket

    srv = tampu_server(users={USER: "secret"})
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(srv.server.config.data_dir / "sendmail.sock"))
        f = sock.makefile("rwb")
        assert f.readline().startswith(b"220 ")
        f.write(b"EHLO localhost\r\n")
        f.flush()
        lines = []
        while not (line := f.readline()).startswith(b"250 "):
            lines.append(line)
        lines.append(line)
        assert not any(b"AUTH" in x or b"STARTTLS" in x for x in lines)
        f.write(b"QUIT\r\n")
        f.flush()
        f.readline()
        f.close()


def test_a_socket_path_longer_than_the_kernel_takes(tmp_path):
    import socket

    from tampu.config import load_config
    from tampu.server import bind_local_socket, remove_local_socket

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    root = make_config_dir(deep / "conf", base=server_toml())
    config = load_config(root)
    assert len(str(config.data_dir / "sendmail.sock")) > 108
    sock = bind_local_socket(config)
    assert sock is not None
    try:
        from tampu.files import unix_socket_path

        with socket.socket(socket.AF_UNIX) as client, \
                unix_socket_path(config.data_dir / "sendmail.sock") as name:
            client.connect(name)  # the kernel accepted the bind and takes the connection
    finally:
        remove_local_socket(sock, config)
    assert not (config.data_dir / "sendmail.sock").exists()
