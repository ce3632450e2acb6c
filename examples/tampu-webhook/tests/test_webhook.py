"""Tests of the webhook backend: ``pip install 'tampu[testing]' .`` then ``pytest``.

The unit tests check the HTTP status mapping and the settings; the last test runs a real
tampu (the test kit's ``tampu_server``) that delivers through the plugin to a real HTTP
server on loopback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError
from tampu_webhook import WebhookBackend, WebhookSettings, result_for

from tampu.testing import ServerFactory


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "sent"), (204, "sent"), (404, "permanent"), (413, "permanent"),
    (500, "temporary"), (503, "temporary"), (302, "temporary"),
])
def test_http_status_mapping(status: int, outcome: str) -> None:
    assert result_for(status, "Reason", "hooks.example:443").status == outcome


def test_settings_are_checked() -> None:
    with pytest.raises(ValidationError):
        WebhookSettings(url="ftp://example.com/")
    s = WebhookSettings(url="http://127.0.0.1:8080/in", domains=["Hook.Example."])
    assert s.domains == ["hook.example"]


class Sink(ThreadingHTTPServer):
    """Records each POST as (recipient, body); answers ``answers[recipient]`` in turn."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        self.answers: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/incoming"


class _Handler(BaseHTTPRequestHandler):
    server: Sink

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        rcpt = self.headers["X-Tampu-Rcpt-To"]
        with self.server.lock:
            self.server.posts.append((rcpt, body))
            answers = self.server.answers.get(rcpt, [200])
            status = answers.pop(0) if len(answers) > 1 else answers[0]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass


@pytest.fixture
def http_sink() -> Iterator[Sink]:
    server = Sink()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_delivers_over_http(tampu_server: ServerFactory, http_sink: Sink) -> None:
    http_sink.answers = {"busy@hook.test": [503, 200], "gone@hook.test": [404]}
    conf = {"60-webhook.toml": f'[plugins.webhook]\nurl = "{http_sink.url}"\n'
                               'domains = ["hook.test"]\ntimeout = 5\n'}
    users = {f"{u}@hook.test": "pw" for u in ("user", "busy", "gone")}  # hook.test is local
    srv = tampu_server(plugins={"webhook": WebhookBackend}, conf=conf, users=users,
                       record=True, deliver=True)
    qid = srv.send("a@example.org", sorted(users)).assert_accepted().qid
    srv.verdicts.wait_record("done", qid=qid, timeout=20)
    by_rcpt = {to: [a["status"] for a in srv.verdicts.attempts(qid, to)] for to in users}
    assert by_rcpt == {"user@hook.test": ["sent"], "busy@hook.test": ["temporary", "sent"],
                       "gone@hook.test": ["permanent"]}
    assert {a["backend"] for a in srv.verdicts.attempts(qid)} == {"webhook"}
    assert sorted(rcpt for rcpt, _ in http_sink.posts) == [
        "busy@hook.test", "busy@hook.test", "gone@hook.test", "user@hook.test"]
    assert all(b"Subject: test" in body for _, body in http_sink.posts)
