"""A third-party delivery backend for real: pip-install examples/tampu-webhook, list it, use it.

The example package is installed into the running environment (and uninstalled afterwards)
exactly as a user would install a plugin from PyPI; tampu finds it through its entry point.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

from tampu.testing import server_toml
from tests.recording import Recorder, send

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tampu-webhook"


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check",
                           "-q"], capture_output=True, text=True, timeout=180)


def _can_build_here() -> bool:
    """Whether this environment's setuptools can build the wheel itself (offline-friendly).

    A fresh venv of Python 3.12+ has no setuptools, and setuptools < 70.1 needs ``wheel`` for
    bdist_wheel: then pip builds in an isolated environment it fills from the package index.
    """
    try:
        found = version("setuptools")
    except PackageNotFoundError:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    major, minor, *_ = (int(x) if x.isdigit() else 0 for x in found.split(".") + ["0"])
    return (major, minor) >= (70, 1)


@pytest.fixture(scope="module")
def webhook_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # build from a copy, so that setuptools' build/ and *.egg-info stay out of the source tree
    src = tmp_path_factory.mktemp("webhook") / "tampu-webhook"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                "__pycache__"))
    isolation = ["--no-build-isolation"] if _can_build_here() else []
    res = _pip("install", "--no-deps", *isolation, str(src))
    assert res.returncode == 0, res.stdout + res.stderr
    importlib.invalidate_caches()
    try:
        yield
    finally:
        res = _pip("uninstall", "-y", "tampu-webhook")
        sys.modules.pop("tampu_webhook", None)
        importlib.invalidate_caches()
        assert res.returncode == 0, res.stdout + res.stderr


class Sink(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 recording each POST; the answer depends on the recipient."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Message, bytes]] = []  # headers: case-insensitive
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
            self.server.posts.append((self.path, self.headers, body))
            answers = self.server.answers.get(rcpt, [200])
            status = answers.pop(0) if len(answers) > 1 else answers[0]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_tampu_plugins_lists_webhook_as_third_party(webhook_installed, tmp_path):
    confd = tmp_path / "conf.d"
    confd.mkdir()
    (confd / "60-webhook.toml").write_text(
        '[plugins.webhook]\nenabled = true\nurl = "http://127.0.0.1:9/x"\ndomains = ["h.test"]\n')
    res = subprocess.run([sys.executable, "-m", "tampu.cli", "plugins", "--config-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.split()[:1] == ["webhook"]]
    assert "enabled" in line and "third-party" in line and "tampu-webhook 0.1.0" in line
    assert "hooks: deliver" in line
    bad = tmp_path / "conf.d" / "60-webhook.toml"
    bad.write_text('[plugins.webhook]\nenabled = true\nurl = "ftp://nowhere"\n')
    res = subprocess.run([sys.executable, "-m", "tampu.cli", "check", "--config-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "plugins.webhook.url" in res.stderr


def test_webhook_delivers_over_http(webhook_installed, sink, tampu_server):
    sink.answers = {"busy@hook.test": [503, 200], "gone@hook.test": [404]}
    fallback = Recorder(retry_delay=0.1)  # accepts every RCPT; delivers what webhook leaves
    fallback.priority = 200
    conf = {"50-dsn.toml": "[plugins.dsn]\nenabled = true\n",
            "60-webhook.toml": f'[plugins.webhook]\nenabled = true\nurl = "{sink.url}"\n'
                               'domains = ["hook.test"]\ntimeout = 5\n'}
    # hook.test is a local domain whose mailboxes the webhook serves: the core's relay guard
    # lets nothing out to a remote domain from an unauthenticated sender, whatever the backend
    srv = tampu_server(plugins=[fallback], deliver=True, conf=conf,
                       base=server_toml(plugins=(), domains=("example.test", "hook.test")))
    assert srv.server.registry.plugins["webhook"].distribution == "tampu-webhook"
    qid = send(srv, "sender@example.org", ["user@hook.test", "busy@hook.test",
                                           "gone@hook.test", "other@example.test"],
               subject="via http", body="Hello over HTTP\r\n")
    fallback.wait_done(qid, timeout=10)

    by_rcpt: dict[str, list[bytes]] = {}
    for path, headers, body in sink.posts:
        assert path == "/incoming"
        assert headers["Content-Type"] == "message/rfc822"
        assert headers["X-Tampu-Queue-ID"] == qid
        assert headers["X-Tampu-Mail-From"] == "sender@example.org"
        by_rcpt.setdefault(headers["X-Tampu-Rcpt-To"], []).append(body)
    assert sorted(by_rcpt) == ["busy@hook.test", "gone@hook.test", "user@hook.test"]
    body = by_rcpt["user@hook.test"][0]
    assert body.startswith(b"Received: from [127.0.0.1] (client.test)")  # as queued
    assert b"Subject: via http\r\n" in body and body.endswith(b"\r\nHello over HTTP\r\n")
    assert len(by_rcpt["busy@hook.test"]) == 2  # 503 -> temporary, retried, then 200
    assert len(by_rcpt["gone@hook.test"]) == 1  # 404 -> permanent, not retried
    assert fallback.attempts_for("other@example.test") == ["sent"]  # not claimed by webhook
    assert fallback.gave_up == [(qid, ["gone@hook.test"])]
    dsn = fallback.wait_delivered("sender@example.org", origin="dsn").parsed()
    block = dict(list(dsn.iter_parts())[1].get_payload()[1].items())
    assert block["Final-Recipient"] == "rfc822; gone@hook.test" and block["Status"] == "5.0.0"
    assert "HTTP 404" in list(dsn.iter_parts())[0].get_content()
