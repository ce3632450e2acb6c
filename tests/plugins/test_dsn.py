"""The dsn plugin: RFC 3464 reports, as built and as delivered to the sender's Maildir."""

from __future__ import annotations

import email
import email.policy
import time
import tomllib
from email.message import EmailMessage
from pathlib import Path

from tampu import DeliveryResult, QueueItem, Recipient, RecipientStatus
from tampu.plugins.dsn import DsnSettings, build_dsn, original_headers
from tests.recording import Recorder, send

ORIGINAL = (b"Received: from client.test by mx; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"From: Sender <sender@example.org>\r\n"
            b"Subject: =?utf-8?q?R=C3=A9union?= de lundi\r\n"
            b"Message-ID: <orig-1@example.org>\r\n"
            b"\r\n"
            b"secret body text\r\n")


def _failed(address: str, original: str | None = None, **kw: object) -> Recipient:
    rcpt = Recipient(address, original or address, **kw)  # type: ignore[arg-type]
    rcpt.status = RecipientStatus.FAILED
    return rcpt


def _parse(data: bytes) -> EmailMessage:
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")  # CRLF throughout
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _blocks(msg: EmailMessage) -> list[dict[str, str]]:
    part = list(msg.iter_parts())[1]
    assert part.get_content_type() == "message/delivery-status"
    return [dict(b.items()) for b in part.get_payload() if not isinstance(b, str)]


def test_report_structure_and_fields():
    bad = _failed("jdoe@remote.example", "john@example.test", last_error="user unknown",
                  last_code=550, last_enhanced="5.1.1",
                  last_remote="mx1.remote.example [192.0.2.1]")
    local = _failed("box@example.test", last_error="maildir: disk quota exceeded",
                    last_remote="maildir")
    noon_utc = 1_699_963_200.0
    item = QueueItem("q1", "sender@example.org", [bad, local], created=noon_utc)
    msg = _parse(build_dsn(item, [bad, local], ORIGINAL, hostname="mx.example.test",
                           from_name="Postmaster"))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert str(msg["From"]) == "Postmaster <MAILER-DAEMON@mx.example.test>"
    assert msg["Subject"] == "Undelivered mail: Réunion de lundi"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig-1@example.org>"
    assert msg["Message-ID"].endswith("@mx.example.test>")
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    per_msg, first, second = _blocks(msg)
    assert per_msg["Reporting-MTA"] == "dns; mx.example.test"
    assert "14 Nov 2023" in per_msg["Arrival-Date"]
    assert first == {
        "Original-Recipient": "rfc822; john@example.test",
        "Final-Recipient": "rfc822; jdoe@remote.example",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx1.remote.example",
        "Diagnostic-Code": "smtp; 550 5.1.1 user unknown",
    }
    # a local backend failure: no remote MTA, no SMTP diagnostic, a generic permanent status
    assert second["Status"] == "5.0.0"
    assert "Remote-MTA" not in second and "Diagnostic-Code" not in second
    text = list(msg.iter_parts())[0].get_content()
    assert "jdoe@remote.example" in text and "(sent to <john@example.test>)" in text
    assert "550 5.1.1 user unknown" in text and "disk quota exceeded" in text
    headers = list(msg.iter_parts())[2].get_payload()
    assert "Message-ID: <orig-1@example.org>" in headers
    assert "secret body text" not in headers  # the body of the original is not returned


def test_timed_out_recipient_gets_447_and_says_so():
    slow = _failed("slow@remote.example", last_error="connection refused")
    item = QueueItem("q2", "sender@example.org", [slow], extra={"timed_out": [slow.address]})
    msg = _parse(build_dsn(item, [slow], ORIGINAL, hostname="h", give_up_after=72000))
    assert _blocks(msg)[1]["Status"] == "4.4.7"
    text = list(msg.iter_parts())[0].get_content()
    assert "kept failing for 20 hours" in text and "connection refused" in text


def test_non_ascii_and_odd_input_do_not_break_it():
    rcpt = _failed("jöhn@exämple.test", last_error="ünknown", last_code=550)
    item = QueueItem("q3", "sender@example.org", [rcpt])
    raw = b"Subject: caf\xc3\xa9 raw 8-bit\r\nX-Long: " + b"y" * 5000 + b"\r\n\r\nbody"
    msg = _parse(build_dsn(item, [rcpt], raw, hostname="h", max_headers=100))
    block = _blocks(msg)[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}hn@ex\\x{E4}mple.test"
    assert block["Diagnostic-Code"].startswith("smtp; 550 ")
    headers_part = list(msg.iter_parts())[2]
    assert headers_part.get_payload(decode=True) == b"Subject: caf\xc3\xa9 raw 8-bit\r\n"
    assert original_headers(b"no blank line at all", 100) == b"no blank line at all"
    assert original_headers(b"A: b\n\nbody", 100) == b"A: b\n"


def test_default_config_enables_dsn():
    conf = Path(__file__).resolve().parents[2] / "conf.d" / "50-dsn.toml"
    table = tomllib.loads(conf.read_text())["plugins"]["dsn"]
    settings = DsnSettings.model_validate(table)
    assert settings.enabled and settings.from_name
    for name, field in DsnSettings.model_fields.items():
        assert field.description, name


def test_dsn_delivered_to_local_sender_maildir(tampu_server):
    """End to end: the bounce lands in the sender's Maildir (delivery_maildir), from <>."""
    rec = Recorder({"bad@example.test": [DeliveryResult.permanent(
        "mailbox disabled", code=550, enhanced="5.2.1", remote="mx.example.test [192.0.2.5]")]},
        default=None)  # everything else goes to delivery_maildir
    conf = {"50-dsn.toml": "[plugins.dsn]\nenabled = true\nfrom_name = \"Bounce Bot\"\n",
            "60-maildir.toml": "[plugins.delivery_maildir]\nenabled = true\n"}
    srv = tampu_server(plugins=[rec], deliver=True, conf=conf)
    qid = send(srv, "sender@example.test", ["bad@example.test"], subject="see you")
    rec.wait(lambda: len(rec.done) == 2, 10, "the item and its DSN")
    new = srv.server.config.data_dir / "mail" / "example.test" / "sender" / "new"
    deadline = time.monotonic() + 5
    while not list(new.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (path,) = new.iterdir()
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert msg["Return-Path"] == "<>"
    assert str(msg["From"]) == "Bounce Bot <MAILER-DAEMON@localhost>"
    assert msg["Subject"] == "Undelivered mail: see you"
    (block,) = [dict(b.items()) for b in list(msg.iter_parts())[1].get_payload()][1:]
    assert block["Status"] == "5.2.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.2.1 mailbox disabled"
    assert f"id {qid}" in list(msg.iter_parts())[2].get_payload()
