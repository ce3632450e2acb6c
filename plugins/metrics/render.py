"""The HTML pieces of the console: table rows, stories, hook latency, the page itself.

Every value is escaped here (``e``), whatever its origin: addresses, error texts, HELO
names and client input all come from outside.
"""

from __future__ import annotations

import html
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any, Final

from tampu.commands.queue import QueueRow
from tampu.commands.why import Line, decision_line
from tampu.item import Recipient
from tampu.plugins.metrics.shared import Collecting

_TONE_OF_STATUS = {"sent": "ok", "temporary": "deferred", "permanent": "failed"}


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def link(path: str, **query: object) -> str:
    """An escaped URL for an ``href``."""
    return e(path + ("?" + urllib.parse.urlencode(query) if query else ""))


def time_of(t: float, full: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if full else "%m-%d %H:%M:%S", time.localtime(t))


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


# ---------------------------------------------------------------------- rows


def _addresses(r: dict[str, Any], expanded: Iterable[dict[str, Any]] | None) -> list[str]:
    found = [str(r.get("from") or ""), str(r.get("qid") or ""), str(r.get("peer") or "")]
    found += [str(a) for a in r.get("to") or []]
    found += [str(d.get("addr") or "") for d in r.get("decisions") or []]
    for other in expanded or ():
        found += [str(x.get("to") or "") for x in other.get("recipients") or []]
    return found


def matches(r: dict[str, Any], needle: str, expanded: list[dict[str, Any]] | None) -> bool:
    return any(needle in value.lower() for value in _addresses(r, expanded) if value)


def queue_matches(row: QueueRow, needle: str) -> bool:
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


def transaction_row(r: dict[str, Any], later: list[dict[str, Any]], live: set[str]) -> str:
    qid = str(r.get("qid") or "")
    href = link("/why", qid=qid) if qid else link("/why", session=r.get("session"))
    verdict, tone = _verdict(r)
    rcpts = [d for d in r.get("decisions") or [] if d.get("stage") == "rcpt"]
    to = "".join(
        f'<li class="{"ok" if str(d.get("reply", ""))[:1] == "2" else "refused"}">'
        f'{e(d.get("addr") or "")}</li>' for d in rcpts[:10])
    if len(rcpts) > 10:
        to += f'<li class="quiet">and {len(rcpts) - 10} more</li>'
    fate, fate_tone = _fate(qid, later, live) if qid else ("-", "info")
    client = f"{r.get('peer') or '?'}"
    if r.get("auth"):
        client += f" ({r['auth']})"
    return (f'<tr data-kind="{e(r.get("kind"))}" data-qid="{e(qid)}">'
            f'<td class="nowrap"><a href="{href}">{e(time_of(float(r.get("t", 0))))}</a></td>'
            f'<td class="nowrap">{e(client)}<br><span class="quiet">session '
            f"{e(r.get('session'))}</span></td><td class=\"addr\">{e(r.get('from') or '')}"
            f'</td><td class="addr"><ul>{to}</ul></td>'
            f'<td class="{tone}">{e(verdict)}</td>'
            f'<td class="{fate_tone}">'
            + (f'<a href="{href}">{e(qid)}</a><br>' if qid else "")
            + f"{e(fate)}</td></tr>")


def _recipient_tone(r: Recipient) -> str:
    if r.pending:
        return "deferred" if r.last_error else "info"
    return _TONE_OF_STATUS.get(r.status.value, "info")


def queue_row(row: QueueRow, now: float) -> str:
    item = row.item
    href = link("/why", qid=row.id)
    if item is None:
        return (f'<tr data-qid="{e(row.id)}"><td><a href="{href}">{e(row.id)}</a></td>'
                f'<td colspan="7" class="failed">unreadable: {e(row.error)}</td></tr>')
    rcpts = "".join(f'<li class="{_recipient_tone(r)}">{e(r.address)} '
                    f'<span class="quiet">{e(r.status.value)}</span></li>'
                    for r in item.recipients[:10])
    if len(item.recipients) > 10:
        rcpts += f'<li class="quiet">and {len(item.recipients) - 10} more</li>'
    held = ' <span class="deferred">held</span>' if item.held else ""
    return (f'<tr data-qid="{e(item.id)}"><td><a href="{href}">{e(item.id)}</a>{held}</td>'
            f"<td>{e(row.age(now))}</td><td class=\"n\">{item.size}</td>"
            f"<td class=\"addr\">{e(item.mail_from or '<>')}</td>"
            f'<td class="addr"><ul>{rcpts}</ul></td>'
            f'<td class="n">{item.attempts}</td><td>{e(row.next_attempt)}</td>'
            f'<td class="deferred">{e(row.last_error)}</td></tr>')


def story(lines: list[Line]) -> str:
    items = "".join(f'<li class="d{line.depth} {line.tone}">{e(line.text)}</li>'
                    for line in lines)
    return f'<ol class="story">{items}</ol>'


def latencies(histogram: Collecting, failures: Collecting,
               ) -> dict[tuple[str, str], tuple[int, float, str, int]]:
    """(plugin, hook) -> (samples, total seconds, the 95th percentile's bucket, failures)."""
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
    """The bucket bound under which a share ``q`` of the samples fell (``≤ 2.50 ms``): what the
    histogram knows, without pretending to more precision."""
    if not count:
        return "-"
    lower = 0.0
    for upper, cumulative in sorted(buckets):
        if cumulative >= q * count:
            return f"> {ms(lower)}" if upper == float("inf") else f"≤ {ms(upper)}"
        lower = upper
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
td{overflow-wrap:break-word}td.addr{min-width:10em;overflow-wrap:anywhere}
.nowrap{white-space:nowrap}.ok{color:var(--ok)}.refused{color:var(--refused)}
.deferred{color:var(--deferred)}.failed{color:var(--failed)}
.search{margin:1em 0;display:flex;gap:.5em;align-items:center;flex-wrap:wrap}
.search input[type=search]{min-width:24em;padding:4px 6px;font:inherit}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:1em}
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


def page(title: str, body: str, head: str = "") -> bytes:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<meta name="referrer" content="no-referrer">{head}'
            f"<title>{e(title)}</title><style>{_STYLE}</style></head>"
            f"<body>{body}</body></html>\n").encode("utf-8", "replace")
