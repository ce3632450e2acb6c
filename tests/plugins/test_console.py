"""The admin console (metrics plugin): real SMTP sessions, then the pages over HTTP and in a
real headless browser (Chromium), whose screenshots are kept as test artifacts."""

from __future__ import annotations

import html
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tampu import DeliveryResult
from tampu.decisions import JOURNAL_DIR, Journal, read_journal, read_journal_tail
from tampu.plugins.metrics.charts import MinuteRing, Series, stacked_bars
from tampu.plugins.metrics.http import MAX_FIELDS, Request, parse_head
from tampu.testing import make_config_dir, start_server, wait_for
from tests.conftest import require_tool
from tests.helpers import RawClient
from tests.recording import Recorder

USER, LATER, PASSWORD = "user@example.test", "later@example.test", "secret"
HOSTILE = '"<script src=x onerror=alert(1)"@evil.example'
"""A valid address (a quoted local part) that is HTML."""
MSG = b"Subject: console\r\n\r\nbody\r\n"
METRICS = '[plugins.metrics]\nenabled = true\naddress = "127.0.0.1:0"\n'
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Traffic:
    srv: object
    port: int
    accepted: str  # delivered
    deferred: str  # greylisted, still queued
    hostile: str  # accepted, from HOSTILE
    refused_session: int




def qid_of(reply: bytes) -> str:
    return reply.decode().rpartition(" ")[2]


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, tampu_ca) -> Iterator[Traffic]:
    rec = Recorder({LATER: [DeliveryResult.temporary(
        "greylisted, try again later", code=451, enhanced="4.7.1",
        remote="mx.example.net [192.0.2.1]")]}, retry_delay=3600, accept_rcpt=False)
    cdir = make_config_dir(tmp_path_factory.mktemp("console"), conf={"60-metrics.toml": METRICS},
                           users={USER: PASSWORD, LATER: PASSWORD}, ca=tampu_ca)
    srv = start_server(cdir, plugins=[rec], deliver=True, ca=tampu_ca)
    try:
        with srv.smtp() as c:  # accepted and delivered
            c.ehlo("client.test")
            c.mail("alice@example.org")
            c.rcpt(USER)
            accepted = qid_of(c.data(MSG)[1])
        with RawClient(srv.port("smtp")) as raw:  # refused: relay at RCPT, then bad syntax
            raw.reply()
            raw.cmd("EHLO client.test")
            assert raw.cmd("MAIL FROM:<mallory@example.org>")[0] == 250
            assert raw.cmd("RCPT TO:<bob@remote.example>")[0] == 550
            assert raw.cmd("RSET")[0] == 250
            assert raw.cmd("MAIL FROM:<<script>alert(2)</script>>")[0] == 501
            raw.cmd("QUIT")
        with srv.smtp() as c:  # deferred by the backend
            c.ehlo("client.test")
            c.mail("carol@example.org")
            c.rcpt(LATER)
            deferred = qid_of(c.data(MSG)[1])
        with RawClient(srv.port("smtp")) as raw:  # a hostile (but valid) sender, accepted
            raw.reply()
            raw.cmd("EHLO client.test")
            assert raw.cmd(f"MAIL FROM:<{HOSTILE}>")[0] == 250
            assert raw.cmd(f"RCPT TO:<{USER}>")[0] == 250
            assert raw.cmd("DATA")[0] == 354
            code, lines = raw.cmd(MSG + b".")
            assert code == 250, lines
            hostile = lines[-1].rpartition(" ")[2]
            raw.cmd("QUIT")
        rec.wait_done(accepted)
        rec.wait_done(hostile)
        rec.wait(lambda: any(a[1] == LATER for a in rec.attempts), what="the deferred attempt")
        journal = srv.server.config.data_dir / JOURNAL_DIR

        def journaled() -> list[dict[str, Any]] | None:
            records = list(read_journal(journal))
            kinds = {(r.get("kind"), r.get("qid")) for r in records}
            ok = {("done", accepted), ("done", hostile), ("attempt", deferred)} <= kinds and \
                any(r.get("kind") == "refused" and r.get("from") == "mallory@example.org"
                    for r in records)
            return records if ok else None

        records = wait_for(journaled, 15.0, what="the journal records")
        session = next(r["session"] for r in records if r.get("from") == "mallory@example.org")
        wait_for(lambda: srv.store.load_now(deferred).recipients[0].last_error,
                 what="the deferred item's state")
        port = srv.server.registry.plugins["metrics"].obj.port
        yield Traffic(srv, port, accepted, deferred, hostile, session)
    finally:
        srv.stop()


def get(t: Traffic, path: str, **headers: str) -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{t.port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Security-Policy", ""), \
                resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, "", exc.read().decode()


class Rows(HTMLParser):
    """Rows of one table (by class) as lists of cell texts, with each row's attributes."""

    def __init__(self, table: str) -> None:
        super().__init__()
        self.table, self.depth = table, 0
        self.rows: list[list[str]] = []
        self.attrs: list[dict[str, str | None]] = []
        self.cell: list[str] | None = None
        self.scripts = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "script":
            self.scripts += 1
        a = dict(attrs)
        if tag == "table":
            self.depth += 1 if (a.get("class") == self.table or self.depth) else 0
        elif self.depth and tag == "tr":
            self.rows.append([])
            self.attrs.append(a)
        elif self.depth and tag == "td":
            self.cell = []

    def handle_endtag(self, tag) -> None:
        if tag == "table" and self.depth:
            self.depth -= 1
        elif tag == "td" and self.cell is not None:
            self.rows[-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data) -> None:
        if self.cell is not None:
            self.cell.append(data + " ")


def rows(page: str, table: str) -> list[tuple[dict[str, str | None], list[str]]]:
    parser = Rows(table)
    parser.feed(page)
    return [(a, r) for a, r in zip(parser.attrs, parser.rows, strict=True) if r]


# ---------------------------------------------------------------------- over HTTP


def test_the_page_shows_refused_and_accepted_transactions(traffic):
    status, policy, page = get(traffic, "/")
    assert status == 200
    assert "script-src" not in policy and "default-src 'none'" in policy  # no script runs
    found = rows(page, "transactions")
    by_qid = {a["data-qid"]: cells for a, cells in found if a["data-qid"]}
    accepted = by_qid[traffic.accepted]
    assert accepted[2] == "alice@example.org" and accepted[3] == USER
    assert accepted[4].startswith("accepted: 250 2.0.0") and "delivered (1)" in accepted[5]
    assert "deferred: 451 4.7.1 greylisted" in by_qid[traffic.deferred][5]
    refused = [cells for a, cells in found if a["data-kind"] == "refused"
               and cells[2] == "mallory@example.org"]
    assert refused and refused[0][3] == "bob@remote.example"
    assert "RCPT <bob@remote.example>: relay refused it (550 5.7.1" in refused[0][4]
    # each transaction links to its decision record
    assert f'href="/why?qid={traffic.accepted}"' in page
    assert f'href="/why?session={traffic.refused_session}"' in page
    assert f"tampu {__import__('tampu').__version__}" in page and "uptime" in page


def test_search_by_address_and_by_queue_id(traffic):
    _, _, page = get(traffic, "/?q=" + urllib.parse.quote("BOB@remote.example"))
    found = rows(page, "transactions")
    assert found and all("bob@remote.example" in " ".join(cells) for _, cells in found)
    assert traffic.accepted not in page
    _, _, page = get(traffic, f"/?q={traffic.deferred}")
    found = rows(page, "transactions")
    assert [a["data-qid"] for a, _ in found] == [traffic.deferred]
    assert [a["data-qid"] for a, _ in rows(page, "queue")] == [traffic.deferred]
    _, _, page = get(traffic, "/?q=" + urllib.parse.quote("nobody@nowhere.example"))
    assert [cells for _, cells in rows(page, "transactions")] == [["none"]]


def test_the_queue_shows_the_deferred_item(traffic):
    _, _, page = get(traffic, "/")
    queue = {a["data-qid"]: cells for a, cells in rows(page, "queue")}
    assert set(queue) == {traffic.deferred}  # the others were delivered
    qid, age, size, sender, rcpts, attempts, next_attempt, error = queue[traffic.deferred]
    assert re.fullmatch(r"\d+s", age) and int(size) > 0 and sender == "carol@example.org"
    assert rcpts == f"{LATER} pending" and attempts == "1"
    assert next_attempt.startswith("next attempt 20")  # an hour from now
    assert "greylisted" in error
    assert "1 item(s)" in page


def test_the_decision_record_pages(traffic):
    status, _, page = get(traffic, f"/why?qid={traffic.deferred}")
    assert status == 200
    text = html.unescape(page)
    assert "MAIL FROM <carol@example.org>: the core accepted it" in text
    assert f"queued as {traffic.deferred}" in text
    assert "delivery attempt 1 to <later@example.test> by recorder via mx.example.net " \
           "[192.0.2.1]: not yet, will retry — 451 4.7.1 greylisted" in text
    assert "still queued: 1 recipient(s) pending, next attempt" in text
    assert "&lt;later@example.test&gt;" in page  # escaped, not a tag
    status, _, page = get(traffic, f"/why?session={traffic.refused_session}")
    assert status == 200
    assert "relay refused it (550 5.7.1" in html.unescape(page)
    assert get(traffic, "/why?qid=zzzzzzzzzzzzzzzzzz")[0] == 404
    assert get(traffic, "/why?qid=../../etc")[0] == 400
    assert get(traffic, "/why")[0] == 400


def test_what_comes_from_mail_is_escaped(traffic):
    _, _, page = get(traffic, "/?q=evil.example")
    assert "<script" not in page.lower()
    assert "&lt;script src=x onerror=alert(1)" in page  # the accepted hostile sender
    assert [a["data-qid"] for a, _ in rows(page, "transactions")] == [traffic.hostile]
    _, _, page = get(traffic, "/?q=alert(2)")  # the refused one, kept raw in the record
    assert "<script" not in page.lower() and "&lt;script&gt;alert(2)" in page
    _, _, page = get(traffic, "/?q=" + urllib.parse.quote('"><script>x</script>'))
    assert "<script" not in page.lower()  # the query echoed in the form
    _, _, page = get(traffic, f"/why?qid={traffic.hostile}")
    assert "<script" not in page.lower() and "&lt;script src=x onerror=alert(1)" in page


def test_charts_plugins_and_server_sections(traffic):
    _, _, page = get(traffic, "/?hours=3")
    assert page.count('<svg class="chart"') == 3
    received = sum(int(n) for n in re.findall(r'data-series="received" data-count="(\d+)"',
                                              page))
    assert received == 3  # three messages accepted
    assert re.search(r'data-series="code:550" data-count="\d+"', page)
    assert re.search(r'data-series="delivery:temporary" data-count="1"', page)
    verdicts = {(c[0], c[1]): (int(c[2]), int(c[3])) for _, c in rows(page, "verdicts")}
    assert verdicts[("relay", "rcpt")] == (0, 1)
    assert verdicts[("localusers", "rcpt")][0] == 3
    assert verdicts[("core", "mail")][1] == 1  # the 501
    latency = {(c[0], c[1]) for _, c in rows(page, "latency")}
    assert ("localusers", "smtp_rcpt_to") in latency
    assert "<td>smtp</td>" in page and "Plugin order" in page


def test_the_http_server_stays_bounded(traffic, monkeypatch):
    from tampu.plugins.metrics import http

    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 1.0)  # read at each request
    status, _, _ = get(traffic, "/", Host="attacker.example:9125")  # DNS rebinding
    assert status == 403
    assert get(traffic, "/", Host="localhost:1")[0] == 200
    many = "&".join(f"f{i}=1" for i in range(MAX_FIELDS + 1))
    assert get(traffic, "/?" + many)[0] == 400
    with socket.create_connection(("127.0.0.1", traffic.port), timeout=10) as s:
        s.sendall(b"GET /?" + b"x" * 9000 + b" HTTP/1.0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 431")
    with socket.create_connection(("127.0.0.1", traffic.port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 405")
    with socket.create_connection(("127.0.0.1", traffic.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n")  # and never the end of the head
        s.settimeout(10)
        started = time.monotonic()
        assert s.recv(100) == b""  # closed after the request timeout
        assert 0.8 < time.monotonic() - started < 5
    _, _, page = get(traffic, "/?refresh=30&hours=6")
    assert '<meta http-equiv="refresh" content="30">' in page and "<b>6h</b>" in page
    _, _, page = get(traffic, "/?refresh=1&hours=99")  # out of range: ignored
    assert 'http-equiv="refresh"' not in page and "<b>1h</b>" in page


# ---------------------------------------------------------------------- in a browser


def artifacts() -> Path:
    path = Path(os.environ.get("TAMPU_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the system Chromium headless with a profile of its own; kill what it started."""
    exe = require_tool("chromium")  # skipped without it; a failure under TAMPU_REQUIRE_TOOLS=1
    with tempfile.TemporaryDirectory(prefix="tampu-chromium-") as profile:
        proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            try:  # its own process group: the browser and its helpers, nothing else
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_in_a_real_browser(traffic):
    base = f"http://127.0.0.1:{traffic.port}"
    shot = artifacts() / "console.png"
    shot.unlink(missing_ok=True)
    done = chromium(f"--screenshot={shot}", "--window-size=1280,1000", base + "/")
    assert done.returncode == 0, done.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == \
        (1280, 1000)
    assert len(png) > 20_000  # a page was drawn, not a blank one
    chromium(f"--screenshot={artifacts() / 'console-full.png'}", "--window-size=1280,2800",
             base + "/?hours=3")  # the whole page, for people to look at

    dom = chromium("--dump-dom", base + "/?q=evil.example")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Content Security Policy" not in dom.stderr  # nothing on the page was blocked
    page = dom.stdout
    assert "<script" not in page.lower()  # the hostile sender stayed text
    found = rows(page, "transactions")
    assert [a["data-qid"] for a, _ in found] == [traffic.hostile]
    assert found[0][1][2] == HOSTILE  # shown as written
    assert page.count("<svg") >= 3 and "<rect" in page

    dom = chromium("--dump-dom", base + f"/why?qid={traffic.accepted}")
    assert "delivery attempt 1 to &lt;user@example.test&gt; by recorder" in dom.stdout
    shot = artifacts() / "console-why.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,800",
             base + f"/why?qid={traffic.deferred}")
    assert shot.stat().st_size > 5_000


# ---------------------------------------------------------------------- the parts


def test_the_minute_ring_is_bounded_and_forgets_old_minutes():
    ring = MinuteRing(minutes=10)
    t0 = 1_000_000 * 60.0
    for minute in range(25):  # more minutes than slots
        ring.add("received", minute + 1, now=t0 + minute * 60 + 5)
    assert len(ring.slots) == 10
    first, counts = ring.window(5, now=t0 + 24 * 60 + 30)
    assert first == 1_000_000 + 20
    assert [c.get("received", 0) for c in counts] == [21, 22, 23, 24, 25]
    _, counts = ring.window(10, now=t0 + 40 * 60)  # long quiet: nothing left
    assert all(not c for c in counts)


def test_stacked_bars_scale_to_the_highest_minute():
    series = [Series("a", "A <b>", "#111"), Series("b", "B", "#222")]
    svg = stacked_bars("T & T", 100, [{"a": 3, "b": 1}, {}, {"a": 1}], series)
    heights = [float(h) for h in re.findall(r'height="([\d.]+)"', svg)]
    assert len(heights) == 3  # a and b in the first minute, a in the third; none when empty
    unit = heights[1]
    assert heights == pytest.approx([3 * unit, unit, unit], abs=0.1)
    assert "A &lt;b&gt;: 4" in svg and "T &amp; T" in svg


def test_the_journal_tail_reads_the_newest_within_its_bound(tmp_path):
    journal = Journal(tmp_path / "j", max_bytes=10_000_000, max_age=0, node="test")
    for i in range(3_000):
        journal.write({"kind": "refused", "session": i, "from": f"s{i}@example.org"})
    journal.close()
    records, complete = read_journal_tail(tmp_path / "j", 10_000_000)
    assert complete and [r["session"] for r in records] == list(range(3_000))
    records, complete = read_journal_tail(tmp_path / "j", 20_000)
    assert not complete and records[-1]["session"] == 2_999
    sessions = [r["session"] for r in records]
    assert sessions == list(range(sessions[0], 3_000)) and len(sessions) < 400


def test_a_search_parses_only_what_matches(tmp_path):
    from tampu.plugins.metrics.console import _read_journal

    journal = Journal(tmp_path / "j", max_bytes=10_000_000, max_age=0, node="test")
    for i in range(2_000):
        qid = f"q{i:05d}"
        journal.write({"kind": "accepted", "session": i, "from": f"s{i}@example.org",
                       "qid": qid, "decisions": []})
        journal.write({"kind": "attempt", "qid": qid, "to": "x@example.test", "status": "sent"})
    journal.close()
    found, complete, since = _read_journal(tmp_path / "j", 10_000_000, b"s1234@example.org")
    assert complete and since > 0
    assert [(r["kind"], r["qid"]) for r in found] == [("accepted", "q01234"),
                                                      ("attempt", "q01234")]
    found, _, _ = _read_journal(tmp_path / "j", 10_000_000, b"example.org")
    assert len(found) == 4_000  # every transaction and its item's record
    found, _, _ = _read_journal(tmp_path / "j", 10_000_000, None)
    assert len(found) == 4_000


@given(st.binary(max_size=300))
def test_parse_head_never_raises(data):
    found = parse_head(data + b"\r\n\r\n")
    assert isinstance(found, Request) or found[0] in (400, 405)


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=8))
def test_parse_head_reads_back_any_query(query):
    target = "/x?" + urllib.parse.urlencode(query)
    found = parse_head(f"GET {target} HTTP/1.1\r\nHost: [::1]:9125\r\n\r\n".encode())
    assert isinstance(found, Request)
    assert found.path == "/x" and found.host == "::1"
    assert {k: found.param(k) for k in query} == query
