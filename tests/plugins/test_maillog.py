"""maillog: real tampu and SMTP clients; the log file (or a syslog socket) is read back."""

from __future__ import annotations

import base64
import json
import re
import smtplib
import socket
import time
from pathlib import Path

import pytest

from tampu.errors import PluginError

USER, PASSWORD = "user@example.test", "Pa55-w0rd-N3ver-Logged"
BODY = b"Subject: maillog\r\n\r\nBODY-MARKER-7781 must not be logged\r\n"
DELIVER = "[plugins.delivery_maildir]\nenabled = true\n"


def maillog(fmt: str = "text", extra: str = "") -> str:
    return f'[plugins.maillog]\nenabled = true\nformat = "{fmt}"\n{extra}\n'


def read_until(path: Path, predicate, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if predicate(text):
            return text
        assert time.monotonic() < deadline, f"mail log never matched; it holds:\n{text}"
        time.sleep(0.05)


def traffic(srv) -> tuple[str, int]:
    """AUTH (a wrong then a right password), a queued message, a refused one."""
    with srv.smtp("submission") as c:
        c.starttls(context=srv.client_tls())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login(USER, "wrong-" + PASSWORD)
        c.login(USER, PASSWORD)
        port = c.sock.getsockname()[1]
        assert c.mail(USER)[0] == 250
        assert c.rcpt(USER)[0] == 250
        code, reply = c.data(BODY)
        assert code == 250
    with srv.smtp() as c:
        c.ehlo()
        assert c.mail("a@example.org")[0] == 250
        assert c.rcpt(USER)[0] == 250
        assert c.data(b"Received: x\r\n" * 60 + BODY)[0] == 554
    return reply.decode().rsplit(" ", 1)[-1], port


def test_text_lines_and_no_secrets(tampu_server):
    srv = tampu_server(conf={"40-d.toml": DELIVER, "61-maillog.toml": maillog()},
                       users={USER: PASSWORD}, deliver=True)
    qid, port = traffic(srv)
    path = srv.server.config.data_dir / "mail.log"
    text = read_until(path, lambda t: "all done" in t and "rejected" in t)
    lines = text.splitlines()
    assert any(re.search(rf"127\.0\.0\.1:{port} auth failed for {USER} \(wrong password\)$", x)
               for x in lines)
    assert any(line.endswith(f"127.0.0.1:{port} auth succeeded for {USER}") for line in lines)
    queued = next(x for x in lines if f"{qid} from=<{USER}> queued" in x)
    assert f"ip=127.0.0.1:{port} to=[<{USER}>]" in queued
    assert "tls=TLSv1." in queued and f"auth={USER}" in queued
    assert f"Queued as {qid}" in queued
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", queued)  # time stamp first
    sent = next(x for x in lines if f"{qid} from=<{USER}> to=<{USER}> sent" in x)
    assert "remote=" in sent
    assert any(f"{qid} from=<{USER}> all done: 1 sent, 0 failed" in x for x in lines)
    rejected = next(x for x in lines if " rejected " in x)
    assert f"from=<a@example.org> to=[<{USER}>] tls=no auth=- - 554 5.4.6" in rejected
    # never the password (plain or in the AUTH PLAIN blob), never the body
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, blob, "BODY-MARKER-7781"):
        assert secret not in text


def test_json_format(tampu_server):
    srv = tampu_server(conf={"61-maillog.toml": maillog("json", 'path = "logs/mail.json"')},
                       users={USER: PASSWORD})
    qid, port = traffic(srv)
    path = srv.server.config.data_dir / "logs" / "mail.json"
    text = read_until(path, lambda t: t.count("\n") >= 5)
    events = [json.loads(line) for line in text.splitlines()]
    kinds = [e["event"] for e in events]
    # smtplib's login() tries PLAIN, then LOGIN: two failures before the success
    assert kinds[:5] == ["auth", "auth", "auth", "queued", "rejected"]
    assert [e["success"] for e in events[:3]] == [False, False, True]
    assert events[0]["reason"] == "wrong password" and events[0]["login"] == USER
    queued = events[3]
    assert queued["qid"] == qid and queued["from"] == USER and queued["to"] == [USER]
    assert queued["ip"] == "127.0.0.1" and queued["port"] == port
    assert queued["auth"] == USER and queued["tls"].startswith("TLSv1.")
    assert queued["reply"]["code"] == 250
    assert events[4]["qid"] is None and events[4]["reply"]["code"] == 554
    assert PASSWORD not in text and "BODY-MARKER" not in text


def test_syslog(tampu_server, tmp_path):
    sock_path = tmp_path / "log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    try:
        srv = tampu_server(conf={"61-maillog.toml": maillog(
            "text", f'syslog = true\nsyslog_socket = "{sock_path}"')}, users={USER: PASSWORD})
        with srv.smtp() as c:
            c.sendmail("a@example.org", [USER], BODY)
        datagram = sock.recv(4096).decode()
    finally:
        sock.close()
    # facility mail (2), severity info (6): <22>; no time stamp (syslog adds its own)
    assert re.match(r"^<22>tampu: \w+ from=<a@example\.org> queued ip=127\.0\.0\.1:\d+ ",
                    datagram), datagram
    assert not (srv.server.config.data_dir / "mail.log").exists()


def test_missing_syslog_socket_stops_start_up(tampu_server, tmp_path):
    conf = maillog("text", f'syslog = true\nsyslog_socket = "{tmp_path}/nope"')
    with pytest.raises(PluginError, match="syslog socket .* does not exist"):
        tampu_server(conf={"61-maillog.toml": conf})


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_error_and_writing_resumes_by_itself(tmp_path, caplog):
    """Lines to a file that cannot take them (``/dev/full``: ENOSPC) are lost with one
    ERROR, not one per line; when the path works again (logrotate, space freed) the
    writer reopens it and says so."""
    from tampu.plugins.maillog import MailLog, MailLogSettings

    link = tmp_path / "mail.log"
    link.symlink_to("/dev/full")
    mail_log = MailLog(MailLogSettings(path=str(link)), tmp_path)
    mail_log.open()
    try:
        with caplog.at_level("WARNING", logger="tampu.plugins.maillog"):
            for n in range(3):
                mail_log.event("queued", f"lost {n}", {})
            deadline = time.monotonic() + 10
            while not any("cannot write" in r.message for r in caplog.records):
                assert time.monotonic() < deadline, "no error reported"
                time.sleep(0.02)
            link.unlink()
            (tmp_path / "real.log").touch()
            link.symlink_to(tmp_path / "real.log")
            mail_log.event("queued", "kept\nline", {})
            text = read_until(tmp_path / "real.log", lambda t: "kept line" in t)
    finally:
        mail_log.close()
    errors = [r for r in caplog.records if "cannot write" in r.message]
    assert len(errors) == 1 and "No space left" in errors[0].message
    assert any("writing to" in r.message and "again" in r.message for r in caplog.records)
    assert "lost" not in text
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} kept line\n", text)
