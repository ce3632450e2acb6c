"""loopdetect: too many ``Received:`` headers is a loop (554 5.4.6); the limit itself is not."""

from __future__ import annotations

import pytest

from tampu.config import load_config
from tampu.errors import ConfigError
from tampu.testing import make_config_dir, runtime_for
from tests.helpers import RawClient, only_queue_item


def message(received: int, *, folded: bool = False) -> bytes:
    hop = (b"Received: from a.example\r\n\tby b.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           if folded else b"Received: from a.example by b.example\r\n")
    return hop * received + b"Subject: loop\r\n\r\nReceived: in the body does not count\r\n"


def send(srv, data: bytes) -> tuple[int, list[str]]:
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(data + b".\r\n")
        return c.reply()


def test_51_received_headers_is_a_loop_50_is_not(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    code, lines = send(srv, message(51))
    assert (code, lines[0][:6]) == (554, "5.4.6 "), lines
    assert srv.queue_items() == []
    code, lines = send(srv, message(50, folded=True))
    assert code == 250, lines
    _, _, queued = only_queue_item(srv)
    assert queued.startswith(b"Received: from [127.0.0.1] (client.test)")  # ours: 51 now
    headers = queued.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert sum(h.startswith(b"Received:") for h in headers) == 51


def test_max_received_setting_and_case(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"},
                       conf={"50-loop.toml": "[plugins.loopdetect]\nmax_received = 3\n"})
    code, lines = send(srv, message(3).replace(b"Received:", b"RECEIVED:", 1))
    assert code == 250, lines
    code, lines = send(srv, message(4).replace(b"Received:", b"received:", 2))
    assert code == 554, lines
    assert len(srv.queue_items()) == 1


@pytest.mark.parametrize("value", ["0", "-5", '"many"'])
def test_bad_max_received_is_a_config_error(tmp_path, value):
    root = make_config_dir(tmp_path / "c", conf={
        "50-loop.toml": f"[plugins.loopdetect]\nmax_received = {value}\n"})
    config = load_config(root)
    with pytest.raises(ConfigError) as info:
        runtime_for(config).registry
    assert "50-loop.toml: key plugins.loopdetect.max_received:" in str(info.value)
