"""metrics with ``[server] workers = 2``: the main process's endpoint counts every process.

A real ``tampu serve`` with two processes on one listener (SO_REUSEPORT spreads the
connections), real SMTP traffic, /metrics and the console scraped over HTTP.
"""

from __future__ import annotations

import os
import smtplib
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import cast

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tampu.plugins.metrics.console import Console, Source
from tampu.plugins.metrics.shared import Share, merge
from tampu.plugins.metrics.status import ErrorRecord, RecentErrors
from tampu.testing import make_config_dir
from tests.helpers import maildir_conf, serving
from tests.recording import fixed_port

MESSAGES = 40


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_the_endpoint_counts_the_traffic_of_every_process(tmp_path):
    port, metrics_port = fixed_port(), fixed_port()
    cdir = make_config_dir(tmp_path / "conf", users={"user@example.test": "pw"},
                           base=maildir_conf(port, "workers = 2\n", f"""\
                               [plugins.metrics]
                               enabled = true
                               address = "127.0.0.1:{metrics_port}"
                               """))
    stale = cdir / "data" / "metrics"
    stale.mkdir(parents=True)
    (stale / "worker-7.json").write_text('{"pid": 1, "samples": {"tampu_connections": '
                                         '[["tampu_connections_total", {"listener": "smtp"}, '
                                         '1000]]}, "minutes": [], "verdicts": []}')
    with serving(cdir, port) as (proc, _log):
        def send(n: int) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.sendmail("sender@example.org", ["user@example.test"],
                                f"Subject: m{n}\r\n\r\nbody\r\n")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, range(MESSAGES)))

        smtp = (("listener", "smtp"),)
        sent = (("backend", "delivery_maildir"), ("result", "sent"))
        deadline = time.monotonic() + 15
        while True:
            metrics = _scrape(metrics_port)
            done = (metrics.get(("tampu_transactions_total", (*smtp, ("reply", "2xx")))),
                    metrics.get(("tampu_delivery_attempts_total", sent)),
                    metrics.get(("tampu_connections_open", smtp)))
            if done == (MESSAGES, MESSAGES, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert done == (MESSAGES, MESSAGES, 0), done
        # the earlier run's file was removed at start: its 1000 connections are not counted
        # (the one more is the test kit's probe of the port)
        assert metrics[("tampu_connections_total", smtp)] in (MESSAGES, MESSAGES + 1)
        assert metrics[("tampu_messages_queued_total", (("origin", "smtp"),))] == MESSAGES
        shared = os.listdir(stale)
        assert shared == ["worker-1.json"], shared  # the worker took part

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=5) as resp:
            page = resp.read().decode()
        # the verdict table: localusers accepted every recipient, whichever process took it
        assert f'<td>localusers</td><td>rcpt</td><td class="n">{MESSAGES}</td>' in page
        assert "counted by every process" in page


def _family(kind: str, name: str, *samples: tuple[str, dict[str, str], float]) -> Metric:
    family = Metric(name, "doc", kind)
    for sample in samples:
        family.add_sample(*sample)
    return family


def test_merge_adds_counters_keeps_the_earliest_created_and_drops_dead_gauges():
    counter = _family("counter", "c", ("c_total", {"l": "a"}, 2.0),
                      ("c_created", {"l": "a"}, 100.0))
    gauge = _family("gauge", "g", ("g", {}, 1.0))
    live = Share(10, True, {"c": [("c_total", {"l": "a"}, 3.0), ("c_created", {"l": "a"}, 50.0),
                                  ("c_total", {"l": "b"}, 4.0)], "g": [("g", {}, 5.0)]})
    dead = Share(11, False, {"c": [("c_total", {"l": "a"}, 10.0)], "g": [("g", {}, 7.0)]})
    merged = {(s.name, tuple(s.labels.items())): s.value
              for f in merge([counter, gauge], [live, dead]) for s in f.samples}
    assert merged == {("c_total", (("l", "a"),)): 15.0, ("c_created", (("l", "a"),)): 50.0,
                      ("c_total", (("l", "b"),)): 4.0, ("g", ()): 6.0}


def test_the_console_shows_the_recent_errors_of_every_process_newest_last():
    errors = RecentErrors(3)
    errors.records.extend([ErrorRecord(10.0, "tampu.a", "main old"),
                           ErrorRecord(30.0, "tampu.a", "main new")])
    console = Console(cast("Source", SimpleNamespace(errors=errors)))
    worker = Share(10, False, errors=[(20.0, "tampu.b", "worker"), (5.0, "tampu.b", "oldest")])
    assert [r.message for r in console._errors([worker])] == ["main old", "worker", "main new"]
    assert [r.message for r in console._errors([])] == ["main old", "main new"]
