"""delivery_lmtp against a real LMTP server (aiosmtpd's LMTP) over TCP and a UNIX socket."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP

from tampu import ConfigError
from tampu.plugins.delivery_lmtp.client import dot_stuff, open_session
from tampu.testing import wait_for
from tests.plugins.delivery_kit import Recorder, load, recipient, send

USERS = {f"{u}@example.test": "secret" for u in ("ok", "full", "gone", "unknown")}


class Handler:
    """Accepts everyone but ``unknown`` at RCPT; after DATA ``full`` gets 452, ``gone`` 550."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, bytes]] = []
        self.lhlo: list[str] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.lhlo.append(hostname)
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("unknown@"):
            return "550 5.1.1 <unknown@example.test> User doesn't exist"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        replies = []
        for rcpt in envelope.rcpt_tos:
            user = rcpt.split("@")[0]
            if user == "full":
                replies.append("452 4.2.2 <full@example.test> Mailbox is full")
            elif user == "gone":
                replies.append("550 5.2.1 <gone@example.test> Mailbox disabled")
            else:
                self.messages.append((envelope.mail_from, rcpt, envelope.original_content))
                replies.append(f"250 2.0.0 <{rcpt}> Saved")
        return "\r\n".join(replies)


class LmtpController(Controller):
    def factory(self):
        return LMTP(self.handler, **self.SMTP_kwargs)


class UnixLmtpController(UnixSocketController):
    def factory(self):
        return LMTP(self.handler, **self.SMTP_kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lmtp_tcp():
    handler = Handler()
    ctl = LmtpController(handler, hostname="127.0.0.1", port=free_port())
    ctl.start()
    yield ctl, handler
    ctl.stop()


@pytest.fixture
def lmtp_unix(tmp_path):
    handler = Handler()
    path = tmp_path / "lmtp.sock"
    ctl = UnixLmtpController(handler, unix_socket=path)
    ctl.start()
    yield path, handler
    ctl.stop()


def conf(endpoint: str, extra: str = "") -> dict[str, str]:
    return {"40-delivery.toml": f"""
        [plugins.delivery_lmtp]
        enabled = true
        {endpoint}
        {extra}
        """}


def test_tcp_per_recipient_replies(tampu_server, lmtp_tcp):
    ctl, handler = lmtp_tcp
    remote = f"127.0.0.1:{ctl.port}"
    recorder = Recorder()
    srv = tampu_server(conf=conf(f'address = "{remote}"'), users=USERS, deliver=True,
                       plugins=[recorder])
    body = b"Subject: lmtp\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n"
    qid = send(srv, "sender@example.org",
               ["ok@example.test", "full@example.test", "gone@example.test"], body)

    ok = recorder.first("ok@example.test")
    assert ok.status == "sent" and ok.code == 250 and ok.enhanced == "2.0.0"
    assert ok.remote == remote
    mail_from, rcpt, content = handler.messages[0]
    assert (mail_from, rcpt) == ("sender@example.org", "ok@example.test")
    assert content.endswith(body)  # dot-stuffing undone by the server: the bytes as sent
    assert handler.lhlo[0] == "localhost"

    gone = recorder.first("gone@example.test")
    assert (gone.status, gone.code, gone.enhanced) == ("permanent", 550, "5.2.1")
    assert "Mailbox disabled" in gone.text and gone.remote == remote

    full = recorder.first("full@example.test")
    assert (full.status, full.code, full.enhanced) == ("temporary", 452, "4.2.2")
    item = load(srv, qid)
    assert item is not None
    pending = recipient(item, "full@example.test")
    assert pending.pending and pending.last_code == 452 and pending.last_enhanced == "4.2.2"
    assert "Mailbox is full" in pending.last_error and pending.last_remote == remote
    assert recipient(item, "gone@example.test").status.value == "failed"
    assert recipient(item, "ok@example.test").status.value == "sent"
    assert len(handler.messages) == 1


def test_unix_socket_normalised_recipient_and_rcpt_refusal(tampu_server, lmtp_unix):
    path, handler = lmtp_unix
    recorder = Recorder()
    srv = tampu_server(conf=conf(f'socket = "{path}"'), users=USERS, deliver=True,
                       plugins=[recorder])
    qid = send(srv, "", ["O.K+Tag@example.test", "unknown@example.test"],
               b"Subject: unix\r\n\r\nhello\r\n")
    ok = recorder.first("O.K+Tag@example.test")
    assert ok.status == "sent" and ok.remote == f"unix:{path}"
    assert handler.messages[0][:2] == ("<>", "ok@example.test")
    refused = recorder.first("unknown@example.test")
    assert (refused.status, refused.code, refused.enhanced) == ("permanent", 550, "5.1.1")
    assert refused.text == "<unknown@example.test> User doesn't exist"
    wait_for(lambda: load(srv, qid) is None, what="item done")


def test_recipient_template_keeps_the_address(tampu_server, lmtp_tcp):
    ctl, handler = lmtp_tcp
    srv = tampu_server(conf=conf(f'address = "127.0.0.1:{ctl.port}"',
                                 'recipient = "%address%"'), users=USERS, deliver=True)
    send(srv, "a@example.org", ["ok+box@example.test"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: handler.messages, what="delivery")
    assert handler.messages[0][1] == "ok+box@example.test"


def test_refused_connection_is_temporary(tampu_server):
    recorder = Recorder()
    srv = tampu_server(conf=conf(f'address = "127.0.0.1:{free_port()}"'), users=USERS,
                       deliver=True, plugins=[recorder])
    qid = send(srv, "a@example.org", ["ok@example.test"], b"Subject: x\r\n\r\nx\r\n")
    result = recorder.first("ok@example.test")
    assert result.status == "temporary" and "Connection refused" in result.text
    item = load(srv, qid)
    assert item is not None and recipient(item, "ok@example.test").pending


def test_missing_socket_is_temporary(tampu_server, tmp_path):
    recorder = Recorder()
    srv = tampu_server(conf=conf(f'socket = "{tmp_path}/nothing.sock"'), users=USERS,
                       deliver=True, plugins=[recorder])
    send(srv, "a@example.org", ["ok@example.test"], b"Subject: x\r\n\r\nx\r\n")
    result = recorder.first("ok@example.test")
    assert result.status == "temporary" and "No such file" in result.text
    assert result.remote == f"unix:{tmp_path}/nothing.sock"


@pytest.fixture
def silent_server():
    """Accepts connections and never says a word (a hung LMTP server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.2)
    stop = threading.Event()
    held = []

    def run():
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    sock.close()


def test_silent_server_times_out(tampu_server, silent_server):
    recorder = Recorder()
    srv = tampu_server(conf=conf(f'address = "127.0.0.1:{silent_server}"', "timeout = 0.5"),
                       users=USERS, deliver=True, plugins=[recorder])
    send(srv, "a@example.org", ["ok@example.test"], b"Subject: x\r\n\r\nx\r\n")
    result = recorder.first("ok@example.test", timeout=5)
    assert result.status == "temporary" and "timed out after 0.5s" in result.text


def test_one_session_many_recipients(lmtp_tcp):
    """The client itself handles RFC 2033's one-reply-per-recipient after DATA."""
    ctl, handler = lmtp_tcp

    async def run():
        session = await open_session(host="127.0.0.1", port=ctl.port)
        try:
            return await session.deliver(
                lhlo="client.test", mail_from="a@example.org",
                recipients=["ok@example.test", "unknown@example.test", "full@example.test",
                            "gone@example.test"],
                message=b"Subject: x\r\n\r\nx\r\n", smtputf8=False)
        finally:
            await session.close()

    outcome = asyncio.run(run())
    codes = {r: (rep.code, rep.enhanced) for r, rep in outcome.per_recipient.items()}
    assert codes == {"ok@example.test": (250, "2.0.0"), "unknown@example.test": (550, "5.1.1"),
                     "full@example.test": (452, "4.2.2"), "gone@example.test": (550, "5.2.1")}
    assert outcome.session_reply is None


def test_dot_stuffing():
    assert dot_stuff(b".a\r\nb\n..c") == b"..a\r\nb\r\n...c\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"


@pytest.mark.parametrize("endpoint", ["", 'address = "127.0.0.1:24"\nsocket = "/x"',
                                      'address = "nohostport"'])
def test_endpoint_validation(tampu_server, endpoint):
    with pytest.raises(ConfigError, match="delivery_lmtp"):
        tampu_server(conf=conf(endpoint), users=USERS)
