"""Reception limits of core/smtp.py: size, recipients, line length, unknown commands, idle
timeout and connection count, each set small in conf.d and checked over a real socket."""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers import RawClient, only_queue_item

MSG = b"Subject: t\r\n\r\nhello\r\n"


def limits(**values: object) -> dict[str, str]:
    body = "".join(f"{k} = {v}\n" for k, v in values.items())
    return {"50-limits.toml": f"[server]\n{body}"}


def transaction(c: RawClient, *rcpts: str) -> None:
    c.reply()
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    for rcpt in rcpts:
        assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250


def test_size_parameter_over_the_limit_refused_at_mail(tampu_server):
    srv = tampu_server(conf=limits(max_message_size=2000))
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        _, lines = c.cmd("EHLO client.test")
        assert "SIZE 2000" in lines
        code, lines = c.cmd("MAIL FROM:<a@example.org> SIZE=2001")
        assert (code, lines[0][:6]) == (552, "5.3.4 "), lines
        assert c.cmd("MAIL FROM:<a@example.org> SIZE=2000")[0] == 250


def test_too_big_data_refused_and_nothing_queued(tampu_server):
    srv = tampu_server(conf=limits(max_message_size=2000),
                       users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        transaction(c, "user@example.test")
        assert c.cmd("DATA")[0] == 354
        c.send_raw(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0)
        c.send_raw((b"y" * 98 + b"\r\n") * 30 + b".\r\n")  # ~3000 bytes
        code, lines = c.reply()
        assert (code, lines[0][:6]) == (552, "5.3.4 "), lines
        assert srv.queue_items() == []
        # the session goes on: a message within the limit is accepted
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        body = (b"z" * 98 + b"\r\n") * 15  # 1500 bytes
        c.send_raw(body + b".\r\n")
        assert c.reply()[0] == 250
    _, _, message = only_queue_item(srv)
    assert message.endswith(body)


def test_too_many_recipients(tampu_server):
    srv = tampu_server(conf=limits(max_recipients=3), users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        transaction(c, "user@example.test", "user+1@example.test", "user+2@example.test")
        code, lines = c.cmd("RCPT TO:<user+3@example.test>")
        assert (code, lines[0][:6]) == (452, "4.5.3 "), lines
        assert c.cmd("DATA")[0] == 354
        c.send_raw(MSG + b".\r\n")
        assert c.reply()[0] == 250
    _, header, _ = only_queue_item(srv)
    assert len(header["recipients"]) == 3


def test_command_line_too_long(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        code, lines = c.cmd("MAIL FROM:<" + "a" * 600 + "@example.org>")
        assert (code, lines[0][:6]) == (501, "5.1.7 "), lines  # a path over 256 octets
        code, lines = c.cmd("NOOP " + "x" * 2000)  # longer than the stream limit too
        assert (code, lines[0][:6]) == (500, "5.5.2 "), lines
        assert c.cmd("NOOP")[0] == 250  # the session is still in step


def test_text_line_too_long_in_data(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        transaction(c, "user@example.test")
        assert c.cmd("DATA")[0] == 354
        c.send_raw(b"Subject: long\r\n\r\n" + b"x" * 1500 + b"\r\nend\r\n.\r\n")
        code, lines = c.reply()
        assert (code, lines[0][:6]) == (500, "5.5.2 "), lines
        assert srv.queue_items() == []
        # 998 characters + CRLF is the RFC 5321 limit: accepted, even dot-stuffed
        longest = b"y" * 998 + b"\r\n"
        stuffed = b"." + b"z" * 997 + b"\r\n"
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(b"Subject: long\r\n\r\n" + longest + b"." + stuffed + b".\r\n")
        assert c.reply()[0] == 250
    _, _, message = only_queue_item(srv)
    assert message.endswith(b"\r\n\r\n" + longest + stuffed)


def test_errors_are_counted_then_421(tampu_server):
    srv = tampu_server(conf=limits(max_errors=3))
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        code, lines = c.cmd("FOO")
        assert (code, lines[0][:6]) == (500, "5.5.1 "), lines
        assert c.cmd("EHLO client.test")[0] == 250  # good commands do not reset the count
        assert c.cmd("MAIL FROM:<bad")[0] == 501  # any 5xx counts, not only unknown verbs
        code, lines = c.cmd("BAZ")
        assert (code, lines[0][:6]) == (500, "5.5.1 "), lines  # the error itself, then
        code, lines = c.reply()
        assert (code, lines[0][:6]) == (421, "4.7.0 "), lines  # ... the close
        assert c.closed_by_server()


@pytest.mark.parametrize("listener", ["smtp", "submissions"])
def test_command_timeout_closes_the_connection(tampu_server, listener):
    srv = tampu_server(conf=limits(command_timeout=0.5))
    tls = srv.client_tls() if listener == "submissions" else None
    with RawClient(srv.port(listener), tls=tls) as c:
        c.reply()
        assert c.cmd("EHLO client.test")[0] == 250
        start = time.monotonic()
        code, lines = c.reply()  # the server says why before it closes
        assert (code, lines[0][:6]) == (421, "4.4.2 "), lines
        assert c.closed_by_server()
        assert 0.3 < time.monotonic() - start < 3
    assert not srv.server.state.connections or _wait_empty(srv)


def _wait_empty(srv) -> bool:
    deadline = time.monotonic() + 3
    while srv.server.state.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    return not srv.server.state.connections


def test_command_timeout_counts_silence_not_transfer_time(tampu_server):
    """A client that keeps sending DATA is not idle, however long the message takes."""
    srv = tampu_server(conf=limits(command_timeout=0.6), users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        transaction(c, "user@example.test")
        assert c.cmd("DATA")[0] == 354
        c.send_raw(b"Subject: slow\r\n\r\n")
        for i in range(6):  # 1.5 s in all, never 0.6 s of silence
            time.sleep(0.25)
            c.send_raw(b"line %d\r\n" % i)
        c.send_raw(b".\r\n")
        code, lines = c.reply()
        assert code == 250, lines
    assert len(srv.queue_items()) == 1


def test_max_connections(tampu_server):
    srv = tampu_server(conf=limits(max_connections=2))
    first, second = RawClient(srv.port("smtp")), RawClient(srv.port("submission"))
    try:
        assert first.reply()[0] == 220 and second.reply()[0] == 220
        with RawClient(srv.port("smtp")) as third:
            code, lines = third.reply()
            assert (code, lines[0][:6]) == (421, "4.7.0 "), lines
            assert third.closed_by_server()
        assert first.cmd("NOOP")[0] == 250  # the others are unaffected
    finally:
        first.close()
    assert _wait_empty_to(srv, 1)
    with RawClient(srv.port("smtp")) as again:
        assert again.reply()[0] == 220
    second.close()


def _wait_empty_to(srv, n: int) -> bool:
    deadline = time.monotonic() + 3
    while len(srv.server.state.connections) > n and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(srv.server.state.connections) <= n


@pytest.mark.parametrize("setting", ["max_message_size = 0", "max_line_length = 100",
                                     "command_timeout = -1", "max_recipients = 0"])
def test_nonsense_limits_are_refused(tmp_path, setting):
    from tampu.config import load_config
    from tampu.errors import ConfigError
    from tampu.testing import make_config_dir

    root = make_config_dir(tmp_path / "c", conf={"50-bad.toml": f"[server]\n{setting}\n"})
    with pytest.raises(ConfigError) as info:
        load_config(root)
    key = setting.split()[0]
    assert f"50-bad.toml: key server.{key}:" in str(info.value)


def test_half_open_connection_is_not_counted_forever(tampu_server):
    srv = tampu_server(conf=limits(max_connections=1))
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", srv.port("smtp")))
        assert s.recv(100).startswith(b"220 ")
        s.close()  # gone without QUIT
        assert _wait_empty_to(srv, 0)
    with RawClient(srv.port("smtp")) as c:
        assert c.reply()[0] == 220
