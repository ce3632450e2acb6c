"""``tampu why``: the story of a message, or of a refusal, in plain words.

    tampu why QID                                  # one message: reception, expansion, delivery
    tampu why --from a@x --to b@y [--since 1h]     # transactions between them (refused ones too)
    tampu why --session N [--since 1d]             # everything of SMTP session N
    ... --json                                     # the records as JSON lines

It reads the decision journal (``<data_dir>/journal/``) and, for an item still queued, the
store (its next attempt, its recipients' state).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from tampu.addresses import normalize_address
from tampu.decisions import JOURNAL_DIR, read_journal

if TYPE_CHECKING:
    from tampu.config import Config
    from tampu.item import QueueItem

_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_STAGES = {"connect": "CONNECT", "helo": "HELO", "auth": "AUTH", "mail": "MAIL FROM",
           "rcpt": "RCPT", "data": "DATA"}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    from tampu.cli import config_dir_option

    p = config_dir_option(sub.add_parser("why", help="why a message was accepted, refused, "
                                         "or is not delivered yet"))
    p.add_argument("qid", nargs="?", help="a queue ID (from a 250 reply or the mail log)")
    p.add_argument("--from", dest="sender", help="the sender (MAIL FROM)")
    p.add_argument("--to", dest="rcpt", help="a recipient (RCPT TO)")
    p.add_argument("--session", type=int, help="an SMTP session number (from the logs)")
    p.add_argument("--since", default="7d", help="how far back: 30m, 12h, 7d (default 7d)")
    p.add_argument("--json", action="store_true", help="the records, one JSON object a line")
    p.set_defaults(func=run)


def parse_since(text: str) -> float:
    m = _SINCE.match(text.strip())
    if m is None:
        raise ValueError(f"--since {text!r}: write 30m, 12h or 7d")
    return time.time() - float(m.group(1)) * _UNITS[m.group(2)]


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _same(a: str, b: str) -> bool:
    try:
        return normalize_address(a) == normalize_address(b)
    except ValueError:
        return a.lower() == b.lower()


def decision_line(d: dict[str, Any]) -> str:
    """``RCPT <bob@example.com>: relay refused it (550 5.7.1 Relaying not permitted)``."""
    stage = _STAGES.get(d.get("stage", ""), str(d.get("stage", "")).upper())
    addr = d.get("addr") or ""
    shown = addr if addr.startswith("<") else f"<{addr}>"
    what = f"{stage} {shown}" if stage in ("MAIL FROM", "RCPT") else f"{stage} {addr}".rstrip()
    reply = d.get("reply", "")
    ok = reply[:1] == "2" or reply[:1] == "3"
    who = "the core" if d.get("plugin") == "core" else str(d.get("plugin"))
    verb = "accepted it" if ok else "refused it"
    if not ok and d.get("plugin") == "core" and stage == "RCPT" and reply.startswith("550 5.1.1"):
        verb = "refused it: no plugin accepted this recipient"
    line = f"{what}: {who} {verb} ({reply})"
    if d.get("results"):
        line += " — " + "; ".join(d["results"])
    return line


def attempt_line(a: dict[str, Any], next_attempt: float = 0.0) -> str:
    where = f" via {a['remote']}" if a.get("remote") else ""
    code = " ".join(str(x) for x in (a.get("code") or "", a.get("enhanced") or "") if x)
    reply = f"{code} {a.get('text', '')}".strip()
    status = {"sent": "delivered", "temporary": "not yet, will retry",
              "permanent": "failed for good"}.get(a.get("status", ""), a.get("status", ""))
    orig = f" (for <{a['orig']}>)" if a.get("orig") and a.get("orig") != a.get("to") else ""
    line = (f"delivery attempt {a.get('attempt')} to <{a.get('to')}>{orig} by "
            f"{a.get('backend')}{where}: {status} — {reply}")
    if a.get("status") == "temporary" and next_attempt:
        line += f"; next attempt {datetime.fromtimestamp(next_attempt).strftime('%H:%M')}"
    return line


Tone = Literal["ok", "refused", "deferred", "failed", "info"]


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a story. ``depth`` 0 is an event (it starts with its time), 1 a decision
    or a detail under it; ``tone`` says how it ended, for a renderer that shows it (the
    console colours it; the text form leaves it out)."""

    text: str
    depth: int = 0
    tone: Tone = "info"

    def __str__(self) -> str:
        return "  " * self.depth + self.text


def _decision_tone(d: dict[str, Any]) -> Tone:
    reply = str(d.get("reply", ""))
    return "ok" if reply[:1] in ("2", "3") else "deferred" if reply[:1] == "4" else "refused"


_ATTEMPT_TONES: dict[str, Tone] = {"sent": "ok", "temporary": "deferred",
                                   "permanent": "failed"}


def reception_story(r: dict[str, Any]) -> list[Line]:
    """An SMTP transaction (an ``accepted`` or ``refused`` record): who, each decision, and
    what was queued."""
    who = f"session {r.get('session')} from {r.get('peer')}"
    if r.get("helo"):
        who += f" (HELO {r['helo']})"
    who += f", authenticated as {r['auth']}" if r.get("auth") else ", not authenticated"
    if r.get("tls"):
        who += f", {r['tls']}"
    lines = [Line(f"{_when(r.get('t', 0))} {who}")]
    lines += [Line(decision_line(d), 1, _decision_tone(d)) for d in r.get("decisions", [])]
    if r.get("kind") == "accepted":
        lines.append(Line(f"queued as {r.get('qid')}", 1, "ok"))
    elif r.get("reply"):
        lines.append(Line(f"nothing queued: {r['reply']}", 1, "refused"))
    else:
        lines.append(Line("nothing queued", 1, "refused"))
    return lines


def item_story(records: list[dict[str, Any]], qid: str,
               live: QueueItem | None = None) -> list[Line]:
    """A queue item: its reception, expansion, each delivery attempt, and where it stands
    (``live``: the item if it is still in the store)."""
    mine = [r for r in records if r.get("qid") == qid]
    mine.sort(key=lambda r: r.get("kind") != "accepted")  # reception first (it is written
    lines: list[Line] = []                                  # when the 250 is, after queueing)
    for r in mine:
        kind = r.get("kind")
        if kind == "accepted":
            lines += reception_story(r)
        elif kind == "queued":
            lines.append(Line(f"{_when(r.get('t', 0))} queued {qid} from <{r.get('from')}> "
                              f"({r.get('origin')}, {r.get('size', 0)} bytes)"))
            for rcpt in r.get("recipients", []):
                route = rcpt.get("route") or {}
                how = ("pipe " + route["pipe"]) if route.get("pipe") else \
                    ("via " + "/".join(route["via"])) if route.get("via") else \
                    "forwarded" if route.get("forward") else ""
                if rcpt.get("orig") != rcpt.get("to") or how:
                    lines.append(Line(f"<{rcpt.get('orig')}> expanded to <{rcpt.get('to')}>"
                                      + (f" ({how})" if how else ""), 1))
                else:
                    lines.append(Line(f"recipient <{rcpt.get('to')}>", 1))
        elif kind == "attempt":
            nxt = live.next_attempt if live is not None else 0.0
            lines.append(Line(f"{_when(r.get('t', 0))} " + attempt_line(r, nxt), 0,
                              _ATTEMPT_TONES.get(str(r.get("status")), "info")))
        elif kind == "done":
            sent, failed = r.get("sent", []), r.get("failed", [])
            lines.append(Line(
                f"{_when(r.get('t', 0))} done: {len(sent)} delivered, {len(failed)} failed"
                + (" (a report goes to the sender, unless it asked for none)" if failed
                   else ""), 0, "failed" if failed else "ok"))
    if live is not None:
        pending = [r.address for r in live.pending]
        state = "on hold" if live.held else (
            f"next attempt {_when(live.next_attempt)}" if live.next_attempt else "in progress")
        lines.append(Line(f"still queued: {len(pending)} recipient(s) pending, {state}", 0,
                          "deferred"))
    return lines


def transactions(records: list[dict[str, Any]], *, sender: str | None = None,
                 rcpt: str | None = None, session: int | None = None) -> list[dict[str, Any]]:
    """The transaction records (``accepted``, ``refused``) matching every filter given."""
    chosen = []
    for r in records:
        if r.get("kind") not in ("accepted", "refused"):
            continue
        if session is not None and r.get("session") != session:
            continue
        if sender and not _same(r.get("from") or "", sender):
            continue
        if rcpt and not any(_same(d.get("addr") or "", rcpt)
                            for d in r.get("decisions", []) if d.get("stage") == "rcpt"):
            continue
        chosen.append(r)
    return chosen


def stories(records: list[dict[str, Any]], *, qid: str | None = None,
            live: QueueItem | None = None, sender: str | None = None, rcpt: str | None = None,
            session: int | None = None) -> list[list[Line]]:
    """The story ``tampu why`` tells and the console shows: of item ``qid`` (one story), or
    of each transaction matching ``sender``/``rcpt``/``session`` (an accepted one told with
    its item's whole life). Empty when nothing is known."""
    if qid:
        if live is None and not any(r.get("qid") == qid for r in records):
            return []
        return [item_story(records, qid, live)]
    return [item_story(records, r["qid"]) if r.get("qid") else reception_story(r)
            for r in transactions(records, sender=sender, rcpt=rcpt, session=session)]


def text(story: list[Line]) -> str:
    return "\n".join(map(str, story))


async def _live_item(config: Config, qid: str) -> QueueItem | None:
    """The item if it is still queued, in whichever store ``[server] queue_store`` names."""
    from tampu.errors import TampuError
    from tampu.stores import make_stores

    try:
        stores = make_stores(config)
        await stores.open()
    except (TampuError, OSError):
        return None
    try:
        return await stores.queue.load(qid)
    except (TampuError, OSError):
        return None
    finally:
        await stores.close()


def run(args: argparse.Namespace) -> int:
    from tampu.cli import load, print_problems
    from tampu.errors import ConfigError

    try:
        config = load(args)
        since = parse_since(args.since)
    except ConfigError as exc:
        print_problems(exc)
        return 2
    except ValueError as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 2
    if not (args.qid or args.sender or args.rcpt or args.session is not None):
        print("tampu: give a queue ID, --from/--to, or --session", file=sys.stderr)
        return 2
    records = list(read_journal(config.data_dir / JOURNAL_DIR, since))
    live = None
    if args.qid:
        live = asyncio.run(_live_item(config, args.qid))
        if args.json:
            found = [r for r in records if r.get("qid") == args.qid]
            for r in found:
                print(json.dumps(r, ensure_ascii=False))
            if found or live is not None:
                return 0
    elif args.json:
        chosen = transactions(records, sender=args.sender, rcpt=args.rcpt,
                              session=args.session)
        for r in chosen:
            print(json.dumps(r, ensure_ascii=False))
        if chosen:
            return 0
    told = [] if args.json else stories(records, qid=args.qid, live=live, sender=args.sender,
                                        rcpt=args.rcpt, session=args.session)
    if not told:
        what = f"nothing known of {args.qid}" if args.qid else "no transaction matches"
        print(f"tampu: {what} (since {_when(since)})", file=sys.stderr)
        return 1
    print("\n".join(map(text, told)))
    return 0
