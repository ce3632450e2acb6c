"""The hand-off from DATA to the queue: the ``<id>.item`` file is there, complete and exact
when the client gets ``250`` (format of core/queue.py: one JSON header line, then the message).
"""

from __future__ import annotations

import base64
import email.utils
import re
import ssl

from tampu import Reply, hookimpl
from tampu.log_format import read_segment
from tampu.testing import wait_for
from tests.helpers import RawClient, only_queue_item, read_queue_item

# 8-bit text, a line that needs dot-stuffing, an empty line, trailing spaces
BODY = ("From: A <a@example.org>\r\nTo: user@example.test\r\nSubject: caf\u00e9\r\n\r\n"
        "first line  \r\n.leading dot\r\n\r\n..two dots\r\nna\u00efve \u2713\r\n").encode()


def stuffed(data: bytes) -> bytes:
    return b"".join(b"." + ln if ln.startswith(b".") else ln
                    for ln in data.splitlines(keepends=True))


def split_received(message: bytes) -> tuple[str, bytes]:
    """The core's Received header (first, folded) and the rest of the message."""
    assert message.startswith(b"Received: ")
    lines = message.split(b"\r\n")
    n = 1
    while lines[n][:1] in (b" ", b"\t"):
        n += 1
    header = b"\r\n".join(lines[:n]).decode()
    return header, b"\r\n".join(lines[n:])


def send_raw(c: RawClient, mail_from: str, rcpts: list[str], data: bytes) -> str:
    assert c.cmd(f"MAIL FROM:<{mail_from}>")[0] == 250
    for rcpt in rcpts:
        code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 250, (rcpt, lines)
    assert c.cmd("DATA")[0] == 354
    c.send_raw(stuffed(data) + b".\r\n")
    code, lines = c.reply()
    assert code == 250 and lines[0].startswith("2.0.0 Queued as "), lines
    return lines[0].rpartition(" ")[2]


def test_plain_smtp_message_is_queued_complete_and_exact(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        qid = send_raw(c, "a@example.org", ["user@example.test"], BODY)
        # the item is durable when the client reads 250: its record is in the queue log
        # (its own file waits until it outlives the record), no half-written file left
        assert [p.name for p in srv.queue_dir.iterdir() if p.is_file()] == []
        logged = {}
        for seg in (srv.queue_dir / "log").glob("*.seg"):
            logged.update(read_segment(seg).puts)
        assert logged == {qid: srv.queue_item_bytes(qid)}
    name, header, message = only_queue_item(srv)
    assert name == qid and re.fullmatch(r"[a-z2-7]{18}", qid)
    assert header["v"] == 2 and header["id"] == qid
    assert header["mail_from"] == "a@example.org"
    assert header["recipients"] == [{
        "address": "user@example.test", "original": "user@example.test", "route": {},
        "status": "pending", "attempts": 0, "last_error": "", "last_code": None,
        "last_enhanced": "", "last_remote": ""}]
    assert header["auth_user"] is None and header["origin"] == "smtp"
    assert header["peer"] == "127.0.0.1" and header["helo"] == "client.test"
    assert header["smtputf8"] is False
    received, rest = split_received(message)
    assert rest == BODY  # byte for byte, dot-stuffing undone
    assert received.startswith("Received: from [127.0.0.1] (client.test)\r\n")
    assert f"\tby localhost (tampu) with ESMTP id {qid}\r\n" in received
    assert '(over smtp, plain, envelope from "a@example.org")' in received
    assert "\tfor <user@example.test>;\r\n" in received
    assert "authenticated" not in received
    date = received.rpartition(";\r\n\t")[2]
    assert email.utils.parsedate_to_datetime(date) is not None


def test_starttls_auth_message_records_tls_and_user(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("submission")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.starttls(srv.client_tls())
        c.cmd("EHLO client.test")
        blob = base64.b64encode(b"\0user@example.test\0secret").decode()
        assert c.cmd(f"AUTH PLAIN {blob}")[0] == 235
        qid = send_raw(c, "user@example.test", ["friend@remote.example", "user@example.test"],
                       BODY)
        assert isinstance(c.sock, ssl.SSLSocket)
        version = c.sock.version()
        cipher = (c.sock.cipher() or ("",))[0]
    header, message = read_queue_item(srv, qid)
    assert header["auth_user"] == "user@example.test"
    assert [r["address"] for r in header["recipients"]] == ["friend@remote.example",
                                                            "user@example.test"]
    received, rest = split_received(message)
    assert rest == BODY
    # an authenticated user's address and login stay private (chasquid does the same)
    assert received.startswith("Received: from client.test\r\n")
    assert "127.0.0.1" not in received and "authenticated" not in received
    assert "user_example" not in received
    assert f"by localhost (tampu) with ESMTPSA id {qid}" in received
    assert f"(over submission, {version} {cipher}, envelope from" in received
    assert "\tfor <" not in received  # two recipients: none named


def test_implicit_tls_and_smtputf8(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("submissions"), tls=srv.client_tls()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        blob = base64.b64encode(b"\0user@example.test\0secret").decode()
        assert c.cmd(f"AUTH PLAIN {blob}")[0] == 235
        assert c.cmd("MAIL FROM:<user@example.test> SMTPUTF8")[0] == 250
        assert c.cmd("RCPT TO:<j\u00fcrgen@m\u00fcnchen.example>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(stuffed(BODY) + b".\r\n")
        code, lines = c.reply()
        assert code == 250, lines
    _, header, message = only_queue_item(srv)
    assert header["smtputf8"] is True
    assert header["recipients"][0]["address"] == "j\u00fcrgen@m\u00fcnchen.example"
    received, rest = split_received(message)
    assert "with UTF8ESMTPSA" in received and "(over submissions, TLS" in received
    assert rest == BODY


class Recorder:
    """Adds a header at DATA and records the notifications around the hand-off."""

    name = "recorder"

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.done: list[tuple[int, str | None]] = []

    @hookimpl
    def smtp_data(self, session, envelope, message):
        message.add_header("X-Checked", "yes;\r\n folded")
        if b"refuse me" in message.data:
            return Reply(550, "5.7.1", "Refused by policy")
        return None

    @hookimpl
    def queue_enqueued(self, item):
        self.enqueued.append(item.id)

    @hookimpl
    def smtp_transaction_done(self, session, envelope, reply, queue_id):
        self.done.append((reply.code, queue_id))


def test_plugin_headers_and_notifications(tampu_server):
    rec = Recorder()
    srv = tampu_server(users={"user@example.test": "secret"}, plugins=[rec])
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        qid = send_raw(c, "a@example.org", ["user@example.test"], BODY)
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(b"Subject: x\r\n\r\nrefuse me\r\n.\r\n")
        code, lines = c.reply()
        assert (code, lines[0]) == (550, "5.7.1 Refused by policy")
    _, _, message = only_queue_item(srv)  # only the first one
    _, rest = split_received(message)
    assert rest == b"X-Checked: yes;\r\n folded\r\n" + BODY
    assert rec.enqueued == [qid]
    assert rec.done == [(250, qid), (550, None)]


def test_queue_full_refused_at_mail(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"},
                       conf={"50-q.toml": "[server]\nmax_queue_items = 1\n"})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        send_raw(c, "a@example.org", ["user@example.test"], BODY)
        code, lines = c.cmd("MAIL FROM:<a@example.org>")
        assert code == 452 and lines[0].startswith("4.3.1"), lines
    assert len(srv.queue_items()) == 1


class FailingObserver:
    """queue_enqueued raises: the item is durable by then."""

    name = "failing_observer"

    @hookimpl
    def queue_enqueued(self, item):
        raise RuntimeError("observer broke")


def test_a_failing_queue_enqueued_neither_refuses_nor_strands_the_message(tampu_server,
                                                                          caplog):
    """The item is durable when queue_enqueued runs (its 250 may have gone): the client
    gets one 250, the failure is logged, and the item is delivered all the same."""
    srv = tampu_server(users={"user@example.test": "secret"}, plugins=[FailingObserver()],
                       conf={"40-maildir.toml": "[plugins.delivery_maildir]\nenabled = true\n"},
                       deliver=True)
    with caplog.at_level("ERROR"), RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        qid = send_raw(c, "a@example.org", ["user@example.test"], BODY)
        assert c.cmd("NOOP") == (250, ["2.0.0 OK"])  # nothing else was sent after the 250
    new = srv.server.config.data_dir / "mail" / "example.test" / "user" / "new"
    wait_for(lambda: new.is_dir() and len(list(new.iterdir())) == 1, what="delivered")
    assert any("failing_observer failed in queue_enqueued: observer broke"
               in r.getMessage() for r in caplog.records)
    assert qid


def test_commands_pipelined_after_the_data_are_answered_after_its_250(tampu_server):
    """The 250 may go from the store's sync completion, before the session task resumes:
    the replies keep their order."""
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        assert "PIPELINING" in c.cmd("EHLO client.test")[1]
        for _ in range(3):
            c.send_raw(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
            assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
            c.send_raw(stuffed(BODY) + b".\r\nRSET\r\nNOOP\r\n")
            code, lines = c.reply()
            assert code == 250 and lines[0].startswith("2.0.0 Queued as "), lines
            assert c.reply() == (250, ["2.0.0 OK"])  # RSET
            assert c.reply() == (250, ["2.0.0 OK"])  # NOOP
    assert len(srv.queue_items()) <= 3


def test_the_250_written_by_the_sync_helper_comes_once_and_in_order(tampu_server):
    """The queue's sync helper writes each session's 250 itself the moment the sync returns
    (tampu.log_sync): with many sessions in one group commit and the next commands
    pipelined behind the message, every session gets its replies exactly once and in
    order, and every message is in the queue."""
    import threading

    srv = tampu_server(users={"user@example.test": "secret"})
    results: list[list[tuple[int, list[str]]]] = []
    lock = threading.Lock()

    def session() -> None:
        with RawClient(srv.port("smtp")) as c:
            c.reply()
            c.cmd("EHLO client.test")
            got = []
            for _ in range(3):
                c.send_raw(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n"
                           b"DATA\r\n")
                got += [c.reply(), c.reply(), c.reply()]
                c.send_raw(stuffed(BODY) + b".\r\nNOOP\r\n")
                got += [c.reply(), c.reply()]
            c.send_raw(b"QUIT\r\n")
            got.append(c.reply())
            assert c.closed_by_server()
            with lock:
                results.append(got)

    threads = [threading.Thread(target=session) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12
    ids = set()
    for got in results:
        codes = [code for code, _lines in got]
        assert codes == [250, 250, 354, 250, 250] * 3 + [221], got
        for i in (3, 8, 13):
            assert got[i][1][0].startswith("2.0.0 Queued as "), got[i]
            ids.add(got[i][1][0].rpartition(" ")[2])
        assert [got[i][1][0] for i in (4, 9, 14)] == ["2.0.0 OK"] * 3  # NOOP's own reply
    assert len(ids) == 36
    for qid in ids:
        read_queue_item(srv, qid)  # each is in the queue


def test_a_sync_helper_that_dies_holding_a_250_closes_the_session_and_loses_nothing(
        tampu_server):
    """The helper is stopped with a session's 250 in its request, then killed: whether the
    client got the 250 is unknown, so the session is closed without a reply; the message was
    synced by the process itself and is delivered (the client would send it again: a
    message twice is allowed, a lost one is not)."""
    import contextlib
    import os
    import signal

    srv = tampu_server(capture=True, users={"first@example.test": "pw",
                                            "second@example.test": "pw"})
    with RawClient(srv.port("smtp")) as c:  # the first put starts the helper
        c.reply()
        c.cmd("EHLO client.test")
        send_raw(c, "a@example.org", ["first@example.test"], BODY)
    group = srv.store._log.group
    assert group._proc is not None
    pid = group._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with RawClient(srv.port("smtp")) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
            assert c.cmd("RCPT TO:<second@example.test>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send_raw(stuffed(BODY) + b".\r\n")
            wait_for(lambda: group._early, what="the 250 in the stopped helper's request")
            os.kill(pid, signal.SIGKILL)
            assert c.closed_by_server()
            assert c.buf == b""  # the stopped helper wrote nothing, nor did the process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert srv.capture.wait_delivered("second@example.test") is not None
