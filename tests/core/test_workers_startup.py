"""``[server] workers > 1``: start-up is all or nothing (real ``tampu serve`` processes).

Every process runs its start-up hooks with its sockets bound but not listening; the main
process lets them all serve only once every one of them is ready. A start-up probe plugin
(a real third-party plugin: a ``.dist-info`` entry point on PYTHONPATH) makes start-up slow
or fail in a chosen process, and a poller connects all along: nobody may ever greet it unless
every process serves.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from tampu.testing import make_config_dir
from tests.helpers import free_ports, smtp_conf, tampu_command

PROBE = '''\
"""A start-up probe for the tests: slow or failing start-up in chosen processes."""

import asyncio
import os
from pathlib import Path

from pydantic import Field

from tampu import PluginSettings, hookimpl
from tampu.workers import current_worker


class ProbeSettings(PluginSettings):
    delay: float = Field(default=0.0, description="Seconds each start-up takes.")
    fail_in: list[int] = Field(default_factory=list, description="Processes (0: main, "
                               "N: worker N) whose start-up fails.")
    marker_dir: str = Field(default="", description="Where to leave marker files.")


class Probe:
    Settings = ProbeSettings

    def __init__(self, ctx):
        self.ctx = ctx

    def _mark(self, what):
        if self.ctx.settings.marker_dir:
            Path(self.ctx.settings.marker_dir, f"{what}-{current_worker()}-{os.getpid()}"
                 ).touch()

    @hookimpl
    async def tampu_startup(self, context):
        self._mark("started")
        await asyncio.sleep(self.ctx.settings.delay)
        if current_worker() in self.ctx.settings.fail_in:
            raise RuntimeError(f"probe: start-up fails in process {current_worker()}")
        self._mark("ready")

    @hookimpl
    async def tampu_shutdown(self, context):
        self._mark("stopped")
'''


@pytest.fixture(scope="module")
def probe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    (root / "tampu_startprobe.py").write_text(PROBE)
    info = root / "tampu_startprobe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tampu-startprobe\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text("[tampu.plugins]\n"
                                           "startprobe = tampu_startprobe:Probe\n")
    return root


def config(root: Path, port: int, *, workers: int = 3, probe: str = "",
           extra: str = "") -> Path:
    return make_config_dir(root, users={"user@example.test": "pw"}, base=smtp_conf(
        port, f"workers = {workers}\n", (textwrap.dedent(f"""
        [plugins.startprobe]
        enabled = true
        {probe}
        """) if probe else "") + textwrap.dedent(extra), shutdown_timeout=5))


class Poller:
    """Connects to ``port`` every 20 ms and remembers whether anybody ever greeted it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.greeted: list[bytes] = []
        self.attempts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.attempts += 1
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    data = sock.recv(100)
                    if data.startswith(b"220"):
                        self.greeted.append(data)
            except OSError:
                pass
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@contextmanager
def started(cdir: Path, probe_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = cdir / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(probe_path)}
    with log.open("wb") as sink:
        proc = subprocess.Popen([*tampu_command(), "serve", "--config-dir", str(cdir)],
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=env)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return {int(p) for p in out.split()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float) -> bool:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def markers(directory: Path, what: str) -> set[int]:
    return {int(p.name.split("-")[1]) for p in directory.glob(f"{what}-*")}


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and "getsockname" not in text, text[-4000:]


# ---------------------------------------------------------------------------- all serve


def test_with_metrics_every_process_serves(tmp_path):
    """Four processes and the metrics plugin, started three times: every time all four
    serve (each takes part of 48 transactions), /metrics answers, and no process fails on
    the metrics address (only the main process serves it)."""
    for attempt in range(3):
        port, mport = free_ports(2)
        cdir = config(tmp_path / f"c{attempt}", port, workers=4, extra=f"""
            [plugins.metrics]
            enabled = true
            address = "127.0.0.1:{mport}"
            """)
        with started(cdir, Path("/nonexistent")) as (proc, log):
            assert wait_for(lambda: "tampu ready" in log.read_text(), 20), log.read_text()
            workers = children(proc.pid)
            assert len(workers) == 3, workers
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                assert r.status == 200

            def send(n: int) -> None:
                import smtplib

                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.sendmail("s@example.org", ["user@example.test"],
                                    f"Subject: {n}\r\n\r\nbody\r\n")

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(send, range(48)))
            text = log.read_text()
            receivers = set(re.findall(r"tampu\[(\d+)\] INFO tampu\.smtp: session=\d+ qid=",
                                       text))
            assert receivers == {str(p) for p in workers | {proc.pid}}, receivers
            assert text.count("metrics: serving") == 1
            assert "is in use" not in text
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        no_traceback(log.read_text())
        assert not any(alive(p) for p in workers)


# ---------------------------------------------------------------------------- none serve


@pytest.mark.parametrize("failing", [2, 0], ids=["worker fails", "main fails"])
def test_one_failed_start_up_means_nobody_serves(tmp_path, probe_path, failing):
    port, = free_ports(1)
    marks = tmp_path / "marks"
    marks.mkdir()
    cdir = config(tmp_path / "c", port, probe=f"delay = 0.8\nfail_in = [{failing}]\n"
                  f'marker_dir = "{marks}"')
    poller = Poller(port)
    try:
        with started(cdir, probe_path) as (proc, log):
            assert wait_for(lambda: len(markers(marks, "started")) == 3, 15), log.read_text()
            workers = children(proc.pid)
            start = time.monotonic()
            code = proc.wait(15)
            took = time.monotonic() - start
    finally:
        poller.stop()
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert took < 8, f"{took:.1f}s to give up"  # not the 30 s of the old reaping
    assert not poller.greeted, poller.greeted
    assert poller.attempts > 20
    assert not any(alive(p) for p in workers), "a worker survived"
    if failing:
        assert "reception worker 2 failed to start" in text, text[-3000:]
        assert "tampu does not serve" in text
        assert markers(marks, "stopped") >= {0}  # the main process shut its hooks down
    else:
        assert "tampu could not start" in text, text[-3000:]
    assert "tampu ready" not in text


def test_a_worker_killed_in_start_up_means_nobody_serves(tmp_path, probe_path):
    port, = free_ports(1)
    marks = tmp_path / "marks"
    marks.mkdir()
    cdir = config(tmp_path / "c", port, probe=f'delay = 1.5\nmarker_dir = "{marks}"')
    poller = Poller(port)
    try:
        with started(cdir, probe_path) as (proc, log):
            assert wait_for(lambda: len(markers(marks, "started")) == 3, 15), log.read_text()
            victim = next(p for p in marks.glob("started-1-*")).name.split("-")[2]
            os.kill(int(victim), signal.SIGKILL)
            code = proc.wait(15)
    finally:
        poller.stop()
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert f"(pid {victim}) ended during start-up (killed by signal 9)" in text, text[-3000:]
    assert not poller.greeted


def test_sigterm_during_start_up_is_a_graceful_stop(tmp_path, probe_path):
    """SIGTERM while every process is in its start-up: the main process stops gracefully
    (exit 0, shutdown hooks run) and so do the workers; nobody ever answered."""
    port, = free_ports(1)
    marks = tmp_path / "marks"
    marks.mkdir()
    cdir = config(tmp_path / "c", port, probe=f'delay = 2.5\nmarker_dir = "{marks}"')
    poller = Poller(port)
    try:
        with started(cdir, probe_path) as (proc, log):
            assert wait_for(lambda: len(markers(marks, "started")) == 3, 15), log.read_text()
            workers = children(proc.pid)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
            assert wait_for(lambda: not any(alive(p) for p in workers), 5)
    finally:
        poller.stop()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert not poller.greeted
    assert markers(marks, "stopped") == {0, 1, 2}, text[-3000:]  # every process, gracefully
    assert "tampu stopped before serving" in text
    assert "tampu ready" not in text
    no_traceback(text)


def test_sigterm_as_soon_as_the_workers_exist(tmp_path, probe_path):
    """SIGTERM as soon as the workers are forked (the configuration is still being built,
    or start-up runs): exit 0, every process gone, nothing served."""
    port, = free_ports(1)
    marks = tmp_path / "marks"
    marks.mkdir()
    cdir = config(tmp_path / "c", port, probe=f'delay = 1.0\nmarker_dir = "{marks}"')
    poller = Poller(port)
    try:
        with started(cdir, probe_path) as (proc, log):
            assert wait_for(lambda: bool(children(proc.pid)), 15)
            workers = children(proc.pid)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
            assert wait_for(lambda: not any(alive(p) for p in workers), 5)
    finally:
        poller.stop()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert not poller.greeted
    assert "tampu ready" not in text
    # what started was shut down again (or the stop came before the start-up hooks)
    assert markers(marks, "started") <= markers(marks, "stopped") | {1, 2}
    no_traceback(text)


def test_slow_start_up_serves_only_when_all_are_ready(tmp_path, probe_path):
    """Start-up taking 1 s in every process: nobody greets before all are ready; then every
    process serves."""
    port, = free_ports(1)
    marks = tmp_path / "marks"
    marks.mkdir()
    cdir = config(tmp_path / "c", port, probe=f'delay = 1.0\nmarker_dir = "{marks}"')
    poller = Poller(port)
    try:
        with started(cdir, probe_path) as (proc, log):
            assert wait_for(lambda: bool(poller.greeted), 20), log.read_text()
            first = time.monotonic()
            assert markers(marks, "ready") == {0, 1, 2}, "greeted before every process was ready"
            workers = children(proc.pid)
            assert len(workers) == 2 and all(alive(p) for p in workers)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    finally:
        poller.stop()
    assert first
    no_traceback(log.read_text())
