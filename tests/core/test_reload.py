"""Reload (SIGHUP, ``tampu reload``): conf.d, users and certificates are re-read; a bad
configuration is refused and the old one keeps serving; open connections carry on."""

from __future__ import annotations

import logging
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tampu.users import UserRecord, hash_password, read_users_file, write_users_file

USER, PASSWORD = "user@example.test", "secret"
OPS = {
    "60-metrics.toml": '[plugins.metrics]\nenabled = true\naddress = "127.0.0.1:0"\n',
    "61-maillog.toml": "[plugins.maillog]\nenabled = true\n",
}
MSG = b"Subject: reload\r\n\r\nbody\r\n"


def test_reload_under_load_loses_nothing(tampu_server):
    srv = tampu_server(conf=OPS, users={USER: PASSWORD})
    errors: list[BaseException] = []
    sent = [0, 0]

    def client(n: int) -> None:
        try:
            for _ in range(2):  # a long session across reloads, then a fresh one
                with srv.smtp() as c:
                    for _ in range(25):
                        c.sendmail("a@example.org", [USER], MSG)
                        sent[n] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    reloads = 0
    while any(t.is_alive() for t in threads) and reloads < 20:
        assert srv.call(srv.server.reload()) is True
        reloads += 1
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sent == [50, 50] and reloads >= 3
    assert len(srv.queue_items()) == 100
    log = srv.server.config.data_dir / "mail.log"
    deadline = time.monotonic() + 10
    while log.read_text().count(" queued ip=") < 100:  # the mail log kept every line
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)


def test_bad_configuration_is_refused_and_the_old_one_serves(tampu_server, caplog):
    caplog.set_level(logging.ERROR, "tampu.server")
    srv = tampu_server(users={USER: PASSWORD})
    confd = srv.config_dir / "conf.d"
    for name, text in [("70-bad.toml", "[plugins.loopdetect\nenabled = true\n"),
                       ("70-bad.toml", "[plugins.loopdetect]\nmax_received = -3\n"),
                       ("70-bad.toml", "[plugins.nosuchplugin]\nenabled = true\n")]:
        (confd / name).write_text(text)
        caplog.clear()
        assert srv.call(srv.server.reload()) is False
        messages = [r.getMessage() for r in caplog.records]
        assert any("reload refused" in m and "70-bad.toml" in m for m in messages), messages
        with srv.smtp() as c:  # still serving, with the old configuration
            c.sendmail("a@example.org", [USER], MSG)
    (confd / "70-bad.toml").unlink()
    assert srv.call(srv.server.reload()) is True


def test_reload_applies_conf_and_users(tampu_server):
    srv = tampu_server(users={USER: PASSWORD})
    many = b"Received: x\r\n" * 10 + MSG
    with srv.smtp() as open_session:  # a session open across the reload
        open_session.ehlo()
        assert open_session.sendmail("a@example.org", [USER], many) == {}
        (srv.config_dir / "conf.d" / "70-loop.toml").write_text(
            "[plugins.loopdetect]\nenabled = true\nmax_received = 5\n")
        path = srv.config_dir / "domains" / "example.test" / "users"
        _, records = read_users_file(path)
        write_users_file(path, {**records, "new": UserRecord("new", hash_password(
            "new-pw", log_n=10))}, "tampu")
        assert srv.call(srv.server.reload()) is True
        with pytest.raises(smtplib.SMTPDataError) as exc:  # new settings, same session
            open_session.sendmail("a@example.org", [USER], many)
        assert exc.value.smtp_code == 554
    with srv.smtp("submission") as c:
        c.starttls(context=srv.client_tls())
        c.login("new@example.test", "new-pw")


def peer_cert(srv, listener: str) -> bytes:
    if listener == "submissions":
        with smtplib.SMTP_SSL("localhost", srv.port(listener), timeout=10,
                              context=srv.client_tls()) as c:
            assert isinstance(c.sock, ssl.SSLSocket)
            return c.sock.getpeercert(binary_form=True) or b""
    with smtplib.SMTP("localhost", srv.port(listener), timeout=10) as c:
        c.starttls(context=srv.client_tls())
        assert isinstance(c.sock, ssl.SSLSocket)
        return c.sock.getpeercert(binary_form=True) or b""


def test_reload_picks_up_new_certificates(tampu_server, tampu_ca):
    srv = tampu_server(users={USER: PASSWORD})
    old = {kind: peer_cert(srv, kind) for kind in ("smtp", "submissions")}
    open_tls = srv.smtp("submissions")  # stays open across the reload
    open_tls.ehlo()
    new = tampu_ca.issue_cert("localhost", "127.0.0.1")
    certdir = srv.config_dir / "certs" / "localhost"
    new.private_key_pem.write_to_path(str(certdir / "privkey.pem"))
    new.cert_chain_pems[0].write_to_path(str(certdir / "fullchain.pem"))
    assert srv.call(srv.server.reload()) is True
    expected = ssl.PEM_cert_to_DER_cert(new.cert_chain_pems[0].bytes().decode())
    for kind in ("smtp", "submissions"):
        got = peer_cert(srv, kind)
        assert got != old[kind] and got == expected
    # a client that sends no SNI gets the new default certificate too
    ctx = srv.client_tls()
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", srv.port("submissions")), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        assert tls.getpeercert(binary_form=True) == expected
    open_tls.login(USER, PASSWORD)  # the old connection still works
    open_tls.quit()


def test_broken_certificate_is_refused(tampu_server):
    srv = tampu_server(users={USER: PASSWORD})
    before = peer_cert(srv, "smtp")
    (srv.config_dir / "certs" / "localhost" / "privkey.pem").write_text("not a key\n")
    assert srv.call(srv.server.reload()) is False
    assert peer_cert(srv, "smtp") == before


def test_tampu_reload_signals_the_server(tmp_path, tampu_ca):
    from tampu.testing import make_config_dir

    cdir = make_config_dir(tmp_path / "srv", users={USER: PASSWORD}, ca=tampu_ca)
    log = open(tmp_path / "server.log", "w+b")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "tampu.cli", "serve", "--config-dir",
                             str(cdir)], stdout=log, stderr=subprocess.STDOUT)
    try:
        pidfile = cdir / "data" / "tampu.pid"
        wait_log(tmp_path / "server.log", "tampu ready", proc)
        assert pidfile.read_text().strip() == str(proc.pid)
        done = subprocess.run([sys.executable, "-m", "tampu.cli", "reload", "--config-dir",
                               str(cdir)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "configuration reloaded" in done.stdout  # the server's own answer
        wait_log(tmp_path / "server.log", "configuration reloaded", proc)
        # a refused configuration: non-zero with the problem, and the server is not asked
        bad = cdir / "conf.d" / "70-bad.toml"
        bad.write_text("[server]\nno_such_key = 1\n")
        done = subprocess.run([sys.executable, "-m", "tampu.cli", "reload", "--config-dir",
                               str(cdir)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and "70-bad.toml" in done.stderr
        assert "key server.no_such_key: unknown key" in done.stderr
        bad.write_text("[plugins.loopdetect\n")
        done = subprocess.run([sys.executable, "-m", "tampu.cli", "reload", "--config-dir",
                               str(cdir)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and "not valid TOML" in done.stderr
        assert (tmp_path / "server.log").read_text().count("configuration reloaded") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    assert proc.returncode == 0
    assert not pidfile.exists()


def wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert proc.poll() is None, path.read_text(errors="replace")
        assert time.monotonic() < deadline, path.read_text(errors="replace")
        time.sleep(0.05)


def test_reload_without_server_fails(tmp_path):
    from tampu.testing import make_config_dir

    cdir = make_config_dir(tmp_path / "srv")
    done = subprocess.run([sys.executable, "-m", "tampu.cli", "reload", "--config-dir",
                           str(cdir)], capture_output=True, text=True, timeout=30,
                          env={**os.environ})
    assert done.returncode == 1 and "no running server" in done.stderr
