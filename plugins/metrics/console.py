"""The admin console (``GET /`` and ``GET /why`` of the metrics listener): read-only.

``/`` shows the version and uptime; throughput, delivery and reply-code charts of the last
hours (per-minute counters of every process of the server, drawn as inline SVG); the recent
transactions with their verdicts, from the decision journal; the queue (``tampu queue list``'s
rows); each plugin's verdicts and hook latency; the recent errors, listeners and plugin order.
``?q=`` searches transactions and the queue by address, queue ID or client address. ``/why``
tells one story, exactly as ``tampu why`` does (``?qid=`` or ``?session=``).

Everything that comes from mail or from clients is HTML-escaped, and the pages carry a
policy that lets no script run. Only the Host names of this server are served (an IP
address, ``localhost``, ``[server] hostname``), so a web page cannot read the console
through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Final, Protocol

from prometheus_client import Counter, Histogram

from tampu import DeliveryResult, ServerContext, __version__
from tampu.commands.queue import QueueRow, queue_rows
from tampu.commands.why import stories, transactions
from tampu.decisions import JOURNAL_DIR, journal_tail, parse_records
from tampu.envelope import Verdict
from tampu.errors import QueueError
from tampu.plugins.metrics.charts import MinuteRing, Series, code_series, stacked_bars
from tampu.plugins.metrics.http import Request, Response, Route
from tampu.plugins.metrics.render import (
    duration,
    e,
    latencies,
    link,
    matches,
    ms,
    page,
    queue_matches,
    queue_row,
    story,
    time_of,
    transaction_row,
)
from tampu.plugins.metrics.shared import Merged, Share, merge_minutes, merge_verdicts
from tampu.plugins.metrics.status import ErrorRecord, RecentErrors, server_sections
from tampu.store import format_age, valid_id

RECENT_BYTES: Final = 1024 * 1024
"""Journal read for the front page (the newest records)."""
SEARCH_BYTES: Final = 16 * 1024 * 1024
"""Journal read for a search or a story: the newest 16 MiB (tens of thousands of records)."""
TRANSACTIONS: Final = 50
FOUND: Final = 200
QUEUE_ROWS: Final = 200
QUEUE_SEARCH: Final = 500
HOURS: Final = (1, 3, 6)
MAX_QUERY: Final = 256
MATCHED_LINES: Final = 5000
"""A search parses at most this many matching journal lines (the newest)."""

_THROUGHPUT = (Series("received", "messages accepted", "#2e7d32"),
               Series("refused", "refusals (any stage)", "#c62828"))
_DELIVERY = (Series("delivery:sent", "delivered", "#1565c0"),
             Series("delivery:temporary", "deferred", "#ef6c00"),
             Series("delivery:permanent", "failed", "#6a1b9a"))


class Source(Protocol):
    """What the console reads of the metrics plugin's state."""

    context: ServerContext
    hook_seconds: Histogram
    hook_failures: Counter
    errors: RecentErrors

    def shares(self) -> list[Share]:
        """What the other processes counted (:mod:`.shared`)."""
        ...


class Console:
    """The console of one server: its per-minute counters, verdict counts and pages."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.started = time.time()
        self.ring = MinuteRing()
        self.verdicts: dict[tuple[str, str], list[int]] = {}
        """(plugin, stage) -> [accepted, refused]."""
        self.reads = asyncio.Semaphore(2)  # journal reads at once (each up to 16 MiB)

    def routes(self) -> dict[str, Route]:
        return {"/": self.index, "/why": self.why}

    # ------------------------------------------------------------------ counting

    def verdict(self, verdict: Verdict) -> None:
        """Count one ``smtp_verdict``: by plugin and stage, and in the per-minute ring."""
        counts = self.verdicts.setdefault((verdict.plugin, verdict.stage), [0, 0])
        counts[1 if verdict.refused else 0] += 1
        if verdict.refused:
            self.ring.add("refused")
        elif verdict.stage == "data":
            self.ring.add("received")
        else:
            return
        self.ring.add(f"code:{verdict.reply.code}")

    def attempt(self, result: DeliveryResult) -> None:
        """Count one delivery attempt (``delivery_attempted``)."""
        self.ring.add(f"delivery:{result.status}")

    # ------------------------------------------------------------------ pages

    def _allowed(self, request: Request) -> bool:
        host = request.host
        if not host:
            return True  # HTTP/1.0 without Host: not a browser
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
        context = self.source.context
        return host == "localhost" or host.endswith(".localhost") or host in (
            context.hostname.lower(), context.node.lower())

    async def _journal(self, max_bytes: int, needle: bytes | None = None,
                       ) -> tuple[list[dict[str, Any]], bool, float]:
        """(records, whether that was the whole journal, the time of the oldest line read)."""
        async with self.reads:
            return await asyncio.to_thread(_read_journal,
                                           self.source.context.data_dir / JOURNAL_DIR,
                                           max_bytes, needle)

    async def index(self, request: Request) -> Response:
        if not self._allowed(request):
            return 403, "text/plain", b"unknown Host\n"
        q = request.param("q").strip()[:MAX_QUERY]
        hours = int(request.param("hours", "1")) if request.param("hours") in ("1", "3",
                                                                              "6") else 1
        refresh = request.param("refresh")
        refresh_s = int(refresh) if refresh.isdigit() and 5 <= int(refresh) <= 3600 else 0
        needle = json.dumps(q, ensure_ascii=False)[1:-1].encode().lower() if q else None
        records, complete, since = await self._journal(SEARCH_BYTES if q else RECENT_BYTES,
                                                       needle)
        store = self.source.context.store
        rows, queued = await queue_rows(store, QUEUE_SEARCH if q else QUEUE_ROWS)
        live = set(await store.ids()) if queued <= 100_000 else {r.id for r in rows}
        shares = self.source.shares()
        body = "".join((
            self._summary(rows, queued),
            self._search(q, hours, complete, since),
            self._charts(hours, shares),
            self._transactions(records, q, live,
                               self.source.context.settings.journal_max_size > 0),
            self._queue(rows, queued, q),
            self._plugins(shares),
            server_sections(self.source.context, self._errors(shares)),
        ))
        head = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
        return 200, "text/html; charset=utf-8", page(
            f"tampu on {self.source.context.hostname}", body, head)

    async def why(self, request: Request) -> Response:
        if not self._allowed(request):
            return 403, "text/plain", b"unknown Host\n"
        qid, session = request.param("qid").strip(), request.param("session").strip()
        if qid and not valid_id(qid) or session and not session.isdigit() or not (qid or
                                                                                  session):
            return 400, "text/plain", b"give ?qid=QUEUE_ID or ?session=N\n"
        needle = qid.encode() if qid else b'"session":%d,' % int(session)
        records, complete, _ = await self._journal(SEARCH_BYTES, needle)
        live = None
        if qid:
            try:
                live = await self.source.context.store.load(qid)
            except QueueError:
                live = None
        told = stories(records, qid=qid or None, live=live,
                       session=int(session) if session else None)
        what = f"queue item {qid}" if qid else f"session {session}"
        command = f"tampu why {qid}" if qid else f"tampu why --session {session}"
        if told:
            body = "".join(story(s) for s in told)
        else:
            body = f'<p class="quiet">Nothing is known of {e(what)}.</p>'
        scope = "the whole journal" if complete else \
            f"the newest {SEARCH_BYTES // 1048576} MiB of the journal"
        content = (f'<p><a href="/">← console</a></p><h1>Why: {e(what)}</h1>'
                f'<p class="quiet">What <code>{e(command)}</code> tells, from {scope}'
                f"{' and the queue' if live is not None else ''}.</p>{body}")
        return (200 if told else 404), "text/html; charset=utf-8", page(f"why {what}", content)

    # ------------------------------------------------------------------ sections

    def _summary(self, rows: list[QueueRow], queued: int) -> str:
        context = self.source.context
        now = time.time()
        oldest = min((r.item.created for r in rows if r.item is not None), default=None)
        age = format_age(now - oldest) if queued and oldest is not None else "-"
        facts = [("version", f"tampu {__version__} (Python {platform.python_version()})"),
                 ("uptime", f"{duration(now - self.started)} (since "
                            f"{time_of(self.started, True)})"),
                 ("host", f"{context.hostname} (node {context.node}, pid {os.getpid()})"),
                 ("queue", f"{queued} item(s); oldest: {age}")]
        items = "".join(f"<div><dt>{e(k)}</dt><dd>{e(v)}</dd></div>" for k, v in facts)
        return (f'<header><h1>tampu on {e(context.hostname)}</h1><nav>'
                '<a href="#charts">charts</a> <a href="#transactions">transactions</a> '
                '<a href="#queue">queue</a> <a href="#plugins">plugins</a> '
                '<a href="#errors">errors</a> <a href="#server">server</a> '
                '<a href="/metrics">/metrics</a></nav></header>'
                f'<dl class="facts" id="facts">{items}</dl>')

    @staticmethod
    def _search(q: str, hours: int, complete: bool, since: float) -> str:
        scope = "the whole journal" if complete else \
            f"the newest {(SEARCH_BYTES if q else RECENT_BYTES) // 1048576} MiB of the journal"
        if since:
            scope += f", since {time_of(since, True)}"
        return (f'<form class="search" method="get" action="/" role="search">'
                f'<label for="q">Address, queue ID or client</label> '
                f'<input id="q" name="q" type="search" value="{e(q)}" maxlength="{MAX_QUERY}"'
                f' placeholder="bob@example.com, QUEUE ID, 192.0.2.1">'
                f'<input type="hidden" name="hours" value="{hours}">'
                f'<button type="submit">Search</button>'
                + (' <a href="/">clear</a>' if q else "") +
                f'<span class="quiet"> {"searched" if q else "reading"} {e(scope)}</span>'
                "</form>")

    def _charts(self, hours: int, shares: list[Share]) -> str:
        first, counts = self.ring.window(hours * 60)
        counts = merge_minutes(first, counts, shares)
        codes = sorted({k[5:] for c in counts for k in c if k.startswith("code:")})
        choose = " · ".join(f"<b>{h}h</b>" if h == hours else
                            f'<a href="{link("/", hours=h)}#charts">{h}h</a>' for h in HOURS)
        return (f'<section id="charts"><h2>The last {hours} hour(s), per minute</h2>'
                f'<p class="quiet">{choose} — counted by every process since it started</p>'
                '<div class="charts">'
                + stacked_bars("Reception", first, counts, _THROUGHPUT)
                + stacked_bars("Delivery attempts", first, counts, _DELIVERY)
                + stacked_bars("Reply codes (refusals and accepted messages)", first, counts,
                               code_series(codes, "code:"))
                + "</div></section>")

    @staticmethod
    def _transactions(records: list[dict[str, Any]], q: str, live: set[str],
                      journal_on: bool = True) -> str:
        by_qid: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r.get("qid") and r.get("kind") in ("queued", "attempt", "done"):
                by_qid.setdefault(str(r["qid"]), []).append(r)
        found = transactions(records)
        if q:
            needle = q.lower()
            found = [r for r in found if matches(r, needle, by_qid.get(r.get("qid") or ""))]
        found.reverse()
        limit = FOUND if q else TRANSACTIONS
        shown = found[:limit]
        rows = "".join(transaction_row(r, by_qid.get(r.get("qid") or "", []), live)
                       for r in shown)
        what = f"matching “{e(q)}”" if q else "most recent first"
        more = f" (the newest {limit} of {len(found)})" if len(found) > limit else ""
        empty = '<tr><td colspan="6" class="quiet">none</td></tr>' if not shown else ""
        return (f'<section id="transactions"><h2>Transactions</h2>'
                f'<p class="quiet">{len(shown)} transaction(s), {what}{more}; each links '
                "to its decision record.</p>"
                + ("" if journal_on else '<p class="deferred">The decision journal is off '
                   "(<code>[server] journal_max_size = 0</code>): no transactions to show.</p>")
                + '<table class="transactions"><thead><tr><th>time</th><th>client</th>'
                "<th>from</th><th>to</th><th>verdict</th><th>now</th></tr></thead>"
                f"<tbody>{rows}{empty}</tbody></table></section>")

    @staticmethod
    def _queue(rows: list[QueueRow], queued: int, q: str) -> str:
        now = time.time()
        if q:
            needle = q.lower()
            rows = [r for r in rows if queue_matches(r, needle)]
        body = "".join(queue_row(r, now) for r in rows)
        if not rows:
            body = '<tr><td colspan="8" class="quiet">none</td></tr>'
        note = f"{queued} item(s)"
        if q:
            note += f"; {len(rows)} matching “{e(q)}”"
            if queued > QUEUE_SEARCH:
                note += f" among the oldest {QUEUE_SEARCH}"
        elif queued > len(rows):
            note += f"; the oldest {len(rows)} shown"
        return (f'<section id="queue"><h2>Queue</h2><p class="quiet">{note} '
                "(<code>tampu queue list</code>)</p>"
                '<table class="queue"><thead><tr><th>queue ID</th><th>age</th><th>size</th>'
                "<th>from</th><th>recipients</th><th>attempts</th><th>next attempt</th>"
                f"<th>last error</th></tr></thead><tbody>{body}</tbody></table></section>")

    def _errors(self, shares: list[Share]) -> list[ErrorRecord]:
        """The recent errors of every process, oldest first (as many as one process keeps)."""
        mine = list(self.source.errors.records)
        theirs = [ErrorRecord(*e) for share in shares for e in share.errors]
        if not theirs:
            return mine
        keep = self.source.errors.records.maxlen or len(mine) + len(theirs)
        return sorted(mine + theirs, key=lambda r: r.when)[-keep:]

    def _plugins(self, shares: list[Share]) -> str:
        verdicts = "".join(
            f"<tr><td>{e(plugin)}</td><td>{e(stage)}</td><td class=\"n\">{ok}</td>"
            f'<td class="n">{no}</td></tr>'
            for (plugin, stage), (ok, no) in sorted(merge_verdicts(self.verdicts,
                                                                   shares).items()))
        if not verdicts:
            verdicts = '<tr><td colspan="4" class="quiet">none yet</td></tr>'
        timing = latencies(Merged(self.source.hook_seconds, lambda: shares),
                           Merged(self.source.hook_failures, lambda: shares))
        lat = "".join(
            f"<tr><td>{e(plugin)}</td><td>{e(hook)}</td><td class=\"n\">{count}</td>"
            f'<td class="n">{ms(total / count) if count else "-"}</td>'
            f'<td class="n">{e(p95)}</td><td class="n">{fails}</td></tr>'
            for (plugin, hook), (count, total, p95, fails) in sorted(timing.items()))
        if not lat:
            lat = '<tr><td colspan="6" class="quiet">none yet</td></tr>'
        return ('<section id="plugins"><h2>Plugins</h2><div class="two">'
                '<div><h3>Verdicts</h3><p class="quiet">who decided, at each stage (core: '
                "syntax, limits, nobody accepted)</p>"
                '<table class="verdicts"><thead><tr><th>plugin</th><th>stage</th>'
                '<th class="n">accepted</th><th class="n">refused</th></tr></thead>'
                f"<tbody>{verdicts}</tbody></table></div>"
                '<div><h3>Hook latency</h3><p class="quiet">sampled: the first call of each '
                "hook, then one in 16, and every failure</p>"
                '<table class="latency"><thead><tr><th>plugin</th><th>hook</th>'
                '<th class="n">samples</th><th class="n">mean</th><th class="n">95% took</th>'
                '<th class="n">failures</th></tr></thead>'
                f"<tbody>{lat}</tbody></table></div></div></section>")


_QID: Final = re.compile(rb'"qid":"([a-z0-9]{1,64})"')


def _read_journal(directory: Path, max_bytes: int,
                  needle: bytes | None) -> tuple[list[dict[str, Any]], bool, float]:
    """The newest records; with ``needle``, only those whose line holds it (lower-case: the
    newest ``MATCHED_LINES`` of them) and every record of the queue items among them (their
    expansion, attempts, end), so that a search parses a few lines, not the whole window."""
    lines, complete = journal_tail(directory, max_bytes)
    first = parse_records(lines[:1])
    since = float(first[0].get("t", 0)) if first else 0.0
    if needle is None:
        return parse_records(lines), complete, since
    matched = [line for line in lines if needle in line.lower()]
    if len(matched) > MATCHED_LINES:
        matched, complete = matched[-MATCHED_LINES:], False
        oldest = parse_records(matched[:1])
        since = float(oldest[0].get("t", 0)) if oldest else since
    found = parse_records(matched)
    qids = {str(r["qid"]).encode() for r in found if r.get("qid")}
    if qids:
        kept = set(matched)
        found += parse_records(lines, lambda line: line not in kept and (
            (m := _QID.search(line)) is not None and m.group(1) in qids))
        found.sort(key=lambda r: r.get("t", 0))
    return found, complete, since
