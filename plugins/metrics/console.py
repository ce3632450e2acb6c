"""The admin console (``GET /`` and ``GET /why`` of the metrics listener): read-only.

``/`` shows the version and uptime; throughput, delivery and reply-code charts of the last
hours (per-minute counters of this process, drawn as inline SVG); the recent transactions with
their verdicts, from the decision journal; the queue (``tampu queue list``'s rows); each
plugin's verdicts and hook latency; the recent errors, listeners and plugin order.
``?q=`` searches transactions and the queue by address, queue ID or client address. ``/why``
tells one story, exactly as ``tampu why`` does (``?qid=`` or ``?session=``).

Everything that comes from mail or from clients is HTML-escaped, and the pages carry a
policy that lets no script run. Only the Host names of this server are served (an IP
address, ``localhost``, ``[server] hostname``), so a web page cannot read the console
through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import os
import platform
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any, Final, Protocol

from prometheus_client import Counter, Histogram

from tampu import DeliveryResult, ServerContext, __version__
from tampu.commands.queue import QueueRow, queue_rows
from tampu.commands.why import Line, decision_line, stories, transactions
from tampu.decisions import JOURNAL_DIR, read_journal_tail
from tampu.envelope import Verdict
from tampu.errors import QueueError
from tampu.item import Recipient
from tampu.plugins.metrics.charts import MinuteRing, Series, code_series, stacked_bars
from tampu.plugins.metrics.http import Request, Response, Route
from tampu.plugins.metrics.status import RecentErrors, server_sections
from tampu.store import format_age, valid_id

RECENT_BYTES: Final = 2 * 1024 * 1024
"""Journal read for the front page (the newest records)."""
SEARCH_BYTES: Final = 16 * 1024 * 1024
"""Journal read for a search or a story: the newest 16 MiB (tens of thousands of records)."""
TRANSACTIONS: Final = 50
FOUND: Final = 200
QUEUE_ROWS: Final = 200
QUEUE_SEARCH: Final = 500
HOURS: Final = (1, 3, 6)
MAX_QUERY: Final = 256

_THROUGHPUT = (Series("received", "messages accepted", "#2e7d32"),
               Series("refused", "refusals (any stage)", "#c62828"))
_DELIVERY = (Series("delivery:sent", "delivered", "#1565c0"),
             Series("delivery:temporary", "deferred", "#ef6c00"),
             Series("delivery:permanent", "failed", "#6a1b9a"))
_TONE_OF_STATUS = {"sent": "ok", "temporary": "deferred", "permanent": "failed"}


class Source(Protocol):
    """What the console reads of the metrics plugin's state."""

    context: ServerContext
    hook_seconds: Histogram
    hook_failures: Counter
    errors: RecentErrors


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _link(path: str, **query: object) -> str:
    """An escaped URL for an ``href``."""
    return _e(path + ("?" + urllib.parse.urlencode(query) if query else ""))


def _time(t: float, full: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if full else "%m-%d %H:%M:%S", time.localtime(t))


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


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

    async def _journal(self, max_bytes: int) -> tuple[list[dict[str, Any]], bool]:
        async with self.reads:
            return await asyncio.to_thread(read_journal_tail,
                                           self.source.context.data_dir / JOURNAL_DIR,
                                           max_bytes)

    async def index(self, request: Request) -> Response:
        if not self._allowed(request):
            return 403, "text/plain", b"unknown Host\n"
        q = request.param("q").strip()[:MAX_QUERY]
        hours = int(request.param("hours", "1")) if request.param("hours") in ("1", "3",
                                                                              "6") else 1
        refresh = request.param("refresh")
        refresh_s = int(refresh) if refresh.isdigit() and 5 <= int(refresh) <= 3600 else 0
        records, complete = await self._journal(SEARCH_BYTES if q else RECENT_BYTES)
        store = self.source.context.store
        rows, queued = await queue_rows(store, QUEUE_SEARCH if q else QUEUE_ROWS)
        live = set(await store.ids()) if queued <= 100_000 else {r.id for r in rows}
        body = "".join((
            self._summary(rows, queued),
            self._search(q, hours, records, complete),
            self._charts(hours),
            self._transactions(records, q, live),
            self._queue(rows, queued, q),
            self._plugins(),
            server_sections(self.source.context, list(self.source.errors.records)),
        ))
        head = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
        return 200, "text/html; charset=utf-8", _page(
            f"tampu on {self.source.context.hostname}", body, head)

    async def why(self, request: Request) -> Response:
        if not self._allowed(request):
            return 403, "text/plain", b"unknown Host\n"
        qid, session = request.param("qid").strip(), request.param("session").strip()
        if qid and not valid_id(qid) or session and not session.isdigit() or not (qid or
                                                                                  session):
            return 400, "text/plain", b"give ?qid=QUEUE_ID or ?session=N\n"
        records, complete = await self._journal(SEARCH_BYTES)
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
            body = "".join(_story(s) for s in told)
        else:
            body = f'<p class="quiet">Nothing is known of {_e(what)}.</p>'
        scope = "the whole journal" if complete else \
            f"the newest {SEARCH_BYTES // 1048576} MiB of the journal"
        page = (f'<p><a href="/">← console</a></p><h1>Why: {_e(what)}</h1>'
                f'<p class="quiet">What <code>{_e(command)}</code> tells, from {scope}'
                f"{' and the queue' if live is not None else ''}.</p>{body}")
        return (200 if told else 404), "text/html; charset=utf-8", _page(f"why {what}", page)

    # ------------------------------------------------------------------ sections

    def _summary(self, rows: list[QueueRow], queued: int) -> str:
        context = self.source.context
        now = time.time()
        oldest = min((r.item.created for r in rows if r.item is not None), default=None)
        age = format_age(now - oldest) if queued and oldest is not None else "-"
        facts = [("version", f"tampu {__version__} (Python {platform.python_version()})"),
                 ("uptime", f"{_duration(now - self.started)} (since "
                            f"{_time(self.started, True)})"),
                 ("host", f"{context.hostname} (node {context.node}, pid {os.getpid()})"),
                 ("queue", f"{queued} item(s); oldest: {age}")]
        items = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts)
        return (f'<header><h1>tampu on {_e(context.hostname)}</h1><nav>'
                '<a href="#charts">charts</a> <a href="#transactions">transactions</a> '
                '<a href="#queue">queue</a> <a href="#plugins">plugins</a> '
                '<a href="#errors">errors</a> <a href="#server">server</a> '
                '<a href="/metrics">/metrics</a></nav></header>'
                f'<dl class="facts" id="facts">{items}</dl>')

    @staticmethod
    def _search(q: str, hours: int, records: list[dict[str, Any]], complete: bool) -> str:
        scope = "the whole journal" if complete else \
            f"the newest {(SEARCH_BYTES if q else RECENT_BYTES) // 1048576} MiB of the journal"
        since = f", since {_time(records[0].get('t', 0), True)}" if records else ""
        return (f'<form class="search" method="get" action="/" role="search">'
                f'<label for="q">Address, queue ID or client</label> '
                f'<input id="q" name="q" type="search" value="{_e(q)}" maxlength="{MAX_QUERY}"'
                f' placeholder="bob@example.com, QUEUE ID, 192.0.2.1">'
                f'<input type="hidden" name="hours" value="{hours}">'
                f'<button type="submit">Search</button>'
                + (' <a href="/">clear</a>' if q else "") +
                f'<span class="quiet"> searching {scope} ({len(records)} '
                f"records{_e(since)})</span></form>")

    def _charts(self, hours: int) -> str:
        first, counts = self.ring.window(hours * 60)
        codes = sorted({k[5:] for c in counts for k in c if k.startswith("code:")})
        choose = " · ".join(f"<b>{h}h</b>" if h == hours else
                            f'<a href="{_link("/", hours=h)}#charts">{h}h</a>' for h in HOURS)
        return (f'<section id="charts"><h2>The last {hours} hour(s), per minute</h2>'
                f'<p class="quiet">{choose} — counted by this process since it started</p>'
                '<div class="charts">'
                + stacked_bars("Reception", first, counts, _THROUGHPUT)
                + stacked_bars("Delivery attempts", first, counts, _DELIVERY)
                + stacked_bars("Reply codes (refusals and accepted messages)", first, counts,
                               code_series(codes, "code:"))
                + "</div></section>")

    @staticmethod
    def _transactions(records: list[dict[str, Any]], q: str, live: set[str]) -> str:
        by_qid: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r.get("qid") and r.get("kind") in ("queued", "attempt", "done"):
                by_qid.setdefault(str(r["qid"]), []).append(r)
        found = transactions(records)
        if q:
            needle = q.lower()
            found = [r for r in found if _matches(r, needle, by_qid.get(r.get("qid") or ""))]
        found.reverse()
        limit = FOUND if q else TRANSACTIONS
        shown = found[:limit]
        rows = "".join(_transaction_row(r, by_qid.get(r.get("qid") or "", []), live)
                       for r in shown)
        what = f"matching “{_e(q)}”" if q else "most recent first"
        more = f" (the newest {limit} of {len(found)})" if len(found) > limit else ""
        empty = '<tr><td colspan="6" class="quiet">none</td></tr>' if not shown else ""
        return (f'<section id="transactions"><h2>Transactions</h2>'
                f'<p class="quiet">{len(shown)} transaction(s), {what}{more}; each links '
                "to its decision record.</p>"
                '<table class="transactions"><thead><tr><th>time</th><th>client</th>'
                "<th>from</th><th>to</th><th>verdict</th><th>now</th></tr></thead>"
                f"<tbody>{rows}{empty}</tbody></table></section>")

    @staticmethod
    def _queue(rows: list[QueueRow], queued: int, q: str) -> str:
        now = time.time()
        if q:
            needle = q.lower()
            rows = [r for r in rows if _queue_matches(r, needle)]
        body = "".join(_queue_row(r, now) for r in rows)
        if not rows:
            body = '<tr><td colspan="8" class="quiet">none</td></tr>'
        note = f"{queued} item(s)"
        if q:
            note += f"; {len(rows)} matching “{_e(q)}”"
            if queued > QUEUE_SEARCH:
                note += f" among the oldest {QUEUE_SEARCH}"
        elif queued > len(rows):
            note += f"; the oldest {len(rows)} shown"
        return (f'<section id="queue"><h2>Queue</h2><p class="quiet">{note} '
                "(<code>tampu queue list</code>)</p>"
                '<table class="queue"><thead><tr><th>queue ID</th><th>age</th><th>size</th>'
                "<th>from</th><th>recipients</th><th>attempts</th><th>next attempt</th>"
                f"<th>last error</th></tr></thead><tbody>{body}</tbody></table></section>")

    def _plugins(self) -> str:
        verdicts = "".join(
            f"<tr><td>{_e(plugin)}</td><td>{_e(stage)}</td><td class=\"n\">{ok}</td>"
            f'<td class="n">{no}</td></tr>'
            for (plugin, stage), (ok, no) in sorted(self.verdicts.items()))
        if not verdicts:
            verdicts = '<tr><td colspan="4" class="quiet">none yet</td></tr>'
        timing = _latencies(self.source.hook_seconds, self.source.hook_failures)
        lat = "".join(
            f"<tr><td>{_e(plugin)}</td><td>{_e(hook)}</td><td class=\"n\">{count}</td>"
            f'<td class="n">{_ms(total / count) if count else "-"}</td>'
            f'<td class="n">{_e(p95)}</td><td class="n">{fails}</td></tr>'
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
                '<th class="n">samples</th><th class="n">mean</th><th class="n">p95</th>'
                '<th class="n">failures</th></tr></thead>'
                f"<tbody>{lat}</tbody></table></div></div></section>")


# ---------------------------------------------------------------------- rows


def _addresses(r: dict[str, Any], expanded: Iterable[dict[str, Any]] | None) -> list[str]:
    found = [str(r.get("from") or ""), str(r.get("qid") or ""), str(r.get("peer") or "")]
    found += [str(a) for a in r.get("to") or []]
    found += [str(d.get("addr") or "") for d in r.get("decisions") or []]
    for other in expanded or ():
        found += [str(x.get("to") or "") for x in other.get("recipients") or []]
    return found


def _matches(r: dict[str, Any], needle: str, expanded: list[dict[str, Any]] | None) -> bool:
    return any(needle in value.lower() for value in _addresses(r, expanded) if value)


def _queue_matches(row: QueueRow, needle: str) -> bool:
    values = [row.id]
    if row.item is not None:
        values += [row.item.mail_from, row.item.peer]
        values += [x for r in row.item.recipients for x in (r.address, r.original)]
    return any(needle in v.lower() for v in values if v)


def _verdict(r: dict[str, Any]) -> tuple[str, str]:
    """(text, tone) of a transaction: the decision that refused it, or its acceptance."""
    decisions = r.get("decisions") or []
    refused = [d for d in decisions if str(d.get("reply", ""))[:1] not in ("2", "3")]
    if r.get("kind") == "accepted":
        text = f"accepted: {r.get('reply', '')}"
        if refused:
            text += f" ({len(refused)} refusal(s) before)"
        return text, "ok"
    if refused:
        last = refused[-1]
        tone = "deferred" if str(last.get("reply", ""))[:1] == "4" else "refused"
        return decision_line(last), tone
    return "no message sent (the client stopped)", "info"


def _fate(qid: str, later: list[dict[str, Any]], live: set[str]) -> tuple[str, str]:
    done = next((r for r in reversed(later) if r.get("kind") == "done"), None)
    if done is not None:
        sent, failed = len(done.get("sent") or []), len(done.get("failed") or [])
        return (f"delivered ({sent})", "ok") if not failed else \
            (f"{failed} failed, {sent} delivered", "failed")
    attempt = next((r for r in reversed(later) if r.get("kind") == "attempt"), None)
    if qid in live:
        if attempt is not None and attempt.get("status") == "temporary":
            reply = " ".join(str(x) for x in (attempt.get("code") or "",
                                              attempt.get("enhanced") or "",
                                              attempt.get("text") or "") if x)
            return f"deferred: {reply}", "deferred"
        return "in the queue", "info"
    if attempt is not None:
        status = str(attempt.get("status"))
        return status, _TONE_OF_STATUS.get(status, "info")
    return "-", "info"


def _transaction_row(r: dict[str, Any], later: list[dict[str, Any]], live: set[str]) -> str:
    qid = str(r.get("qid") or "")
    href = _link("/why", qid=qid) if qid else _link("/why", session=r.get("session"))
    verdict, tone = _verdict(r)
    rcpts = [d for d in r.get("decisions") or [] if d.get("stage") == "rcpt"]
    to = "".join(
        f'<li class="{"ok" if str(d.get("reply", ""))[:1] == "2" else "refused"}">'
        f'{_e(d.get("addr") or "")}</li>' for d in rcpts[:10])
    if len(rcpts) > 10:
        to += f'<li class="quiet">and {len(rcpts) - 10} more</li>'
    fate, fate_tone = _fate(qid, later, live) if qid else ("-", "info")
    client = f"{r.get('peer') or '?'}"
    if r.get("auth"):
        client += f" ({r['auth']})"
    return (f'<tr data-kind="{_e(r.get("kind"))}" data-qid="{_e(qid)}">'
            f'<td><a href="{href}">{_e(_time(float(r.get("t", 0))))}</a></td>'
            f"<td>{_e(client)}<br><span class=\"quiet\">session {_e(r.get('session'))}"
            f"</span></td><td>{_e(r.get('from') or '')}</td><td><ul>{to}</ul></td>"
            f'<td class="{tone}">{_e(verdict)}</td>'
            f'<td class="{fate_tone}">'
            + (f'<a href="{href}">{_e(qid)}</a><br>' if qid else "")
            + f"{_e(fate)}</td></tr>")


def _recipient_tone(r: Recipient) -> str:
    if r.pending:
        return "deferred" if r.last_error else "info"
    return _TONE_OF_STATUS.get(r.status.value, "info")


def _queue_row(row: QueueRow, now: float) -> str:
    item = row.item
    href = _link("/why", qid=row.id)
    if item is None:
        return (f'<tr data-qid="{_e(row.id)}"><td><a href="{href}">{_e(row.id)}</a></td>'
                f'<td colspan="7" class="failed">unreadable: {_e(row.error)}</td></tr>')
    rcpts = "".join(f'<li class="{_recipient_tone(r)}">{_e(r.address)} '
                    f'<span class="quiet">{_e(r.status.value)}</span></li>'
                    for r in item.recipients[:10])
    if len(item.recipients) > 10:
        rcpts += f'<li class="quiet">and {len(item.recipients) - 10} more</li>'
    held = ' <span class="deferred">held</span>' if item.held else ""
    return (f'<tr data-qid="{_e(item.id)}"><td><a href="{href}">{_e(item.id)}</a>{held}</td>'
            f"<td>{_e(row.age(now))}</td><td class=\"n\">{item.size}</td>"
            f"<td>{_e(item.mail_from or '<>')}</td><td><ul>{rcpts}</ul></td>"
            f'<td class="n">{item.attempts}</td><td>{_e(row.next_attempt)}</td>'
            f'<td class="deferred">{_e(row.last_error)}</td></tr>')


def _story(lines: list[Line]) -> str:
    items = "".join(f'<li class="d{line.depth} {line.tone}">{_e(line.text)}</li>'
                    for line in lines)
    return f'<ol class="story">{items}</ol>'


def _latencies(histogram: Histogram, failures: Counter,
               ) -> dict[tuple[str, str], tuple[int, float, str, int]]:
    """(plugin, hook) -> (samples, total seconds, p95 from the buckets, failures)."""
    counts: dict[tuple[str, str], int] = {}
    sums: dict[tuple[str, str], float] = {}
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for metric in histogram.collect():
        for s in metric.samples:
            key = (s.labels.get("plugin", ""), s.labels.get("hook", ""))
            if s.name.endswith("_count"):
                counts[key] = int(s.value)
            elif s.name.endswith("_sum"):
                sums[key] = s.value
            elif s.name.endswith("_bucket"):
                buckets.setdefault(key, []).append((float(s.labels["le"]), s.value))
    fails: dict[tuple[str, str], int] = {}
    for metric in failures.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                key = (s.labels.get("plugin", ""), s.labels.get("hook", ""))
                fails[key] = fails.get(key, 0) + int(s.value)
    out = {}
    for key in counts.keys() | fails.keys():
        n = counts.get(key, 0)
        out[key] = (n, sums.get(key, 0.0), _quantile(buckets.get(key, []), n, 0.95),
                    fails.get(key, 0))
    return out


def _quantile(buckets: list[tuple[float, float]], count: int, q: float) -> str:
    """An estimate from cumulative buckets (linear within the bucket), as Prometheus's
    histogram_quantile does."""
    if not count:
        return "-"
    rank = q * count
    lower, below = 0.0, 0.0
    for upper, cumulative in sorted(buckets):
        if cumulative >= rank:
            if upper == float("inf"):
                return f"> {_ms(lower)}"
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            return _ms(lower + (upper - lower) * share)
        lower, below = upper, cumulative
    return "-"


# ---------------------------------------------------------------------- page

_STYLE: Final = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#fff;--alt:#f6f8fa;--link:#0550ae;
--ok:#1a7f37;--refused:#cf222e;--deferred:#9a6700;--failed:#8250df}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--line:#3d444d;
--bg:#0d1117;--alt:#151b23;--link:#4493f8;--ok:#3fb950;--refused:#f85149;--deferred:#d29922;
--failed:#ab7df8}}
body{font:14px/1.45 system-ui,sans-serif;color:var(--fg);background:var(--bg);margin:0 auto;
max-width:1400px;padding:0 1.5em 3em}
a{color:var(--link)}header{display:flex;align-items:baseline;gap:2em;flex-wrap:wrap}
h1{font-size:1.5em;margin:.8em 0 .3em}h2{font-size:1.2em;margin:1.6em 0 .3em;
border-bottom:1px solid var(--line)}h3{font-size:1em;margin:.6em 0 .2em}
nav a{margin-right:.8em}.facts{display:flex;flex-wrap:wrap;gap:.4em 2.5em;margin:.5em 0}
.facts dt{color:var(--muted);font-size:.85em}.facts dd{margin:0}
.quiet{color:var(--muted)}table{border-collapse:collapse;width:100%}
th,td{padding:4px 10px;text-align:left;vertical-align:top;border-bottom:1px solid var(--line)}
th{font-size:.85em;color:var(--muted);font-weight:600}
tbody tr:nth-child(even){background:var(--alt)}
td ul{list-style:none;margin:0;padding:0}.n{text-align:right;font-variant-numeric:tabular-nums}
td{overflow-wrap:anywhere}.ok{color:var(--ok)}.refused{color:var(--refused)}
.deferred{color:var(--deferred)}.failed{color:var(--failed)}
.search{margin:1em 0;display:flex;gap:.5em;align-items:center;flex-wrap:wrap}
.search input[type=search]{min-width:24em;padding:4px 6px;font:inherit}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1em}
figure{margin:0}figcaption{font-weight:600;margin-bottom:.2em}.chart{width:100%;height:auto}
.chart .grid{stroke:var(--line);stroke-width:1}.chart .axis{fill:var(--muted);font-size:11px}
.legend{list-style:none;padding:0;margin:.2em 0;display:flex;flex-wrap:wrap;gap:.3em 1.2em;
font-size:.85em}.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.35em;
vertical-align:-.05em;border-radius:2px}.two{display:grid;
grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:2em}
.story{list-style:none;padding:0;font-family:ui-monospace,monospace;font-size:13px;
border-left:3px solid var(--line);padding-left:1em;margin:1em 0 1.5em}
.story .d1{padding-left:2em}.errors{font-family:ui-monospace,monospace;font-size:13px}
"""


def _page(title: str, body: str, head: str = "") -> bytes:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="referrer" content="no-referrer">{head}'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>\n").encode("utf-8", "replace")
