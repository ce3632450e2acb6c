"""``tampu queue``: the queue at Postfix's level (postqueue -p/-j/-f/-s, postsuper -d/-h/-H/-r,
postcat).

Reading works on a running or a stopped server, on the store ``[server] queue_store`` names.
With the filesystem store, changes go to the running server as requests (the store keeps them,
SIGUSR1 wakes the server), so they never race a delivery; with no server running they are
applied to the store directly. A shared store (PostgreSQL) applies them at once, and every
node sees them: a held item is claimed by no node, a retried one by the next node that looks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tampu.addresses import domain_of
from tampu.backends import SharedQueueStore
from tampu.config import Config
from tampu.errors import ConfigError, QueueError, TampuError
from tampu.item import QueueItem
from tampu.store import QueueStore, format_age, valid_id
from tampu.store_files import FilesystemStore
from tampu.stores import Stores, make_stores


def register(sub: argparse._SubParsersAction[Any]) -> None:
    from tampu.cli import config_dir_option

    q = config_dir_option(sub.add_parser("queue", help="inspect and act on the queue"))
    qs = q.add_subparsers(dest="queue_command", required=True)
    ls = config_dir_option(qs.add_parser("list", help="items with size, arrival, next "
                                         "attempt, sender, recipients, last error (postqueue "
                                         "-p)"))
    ls.add_argument("--json", action="store_true", help="one JSON object per item "
                    "(postqueue -j)")
    show = config_dir_option(qs.add_parser("show", help="one item (postcat)"))
    show.add_argument("id")
    part = show.add_mutually_exclusive_group()
    for flag in ("--envelope", "--headers", "--body"):
        part.add_argument(flag, action="store_true", help=f"only the {flag[2:]}")
    for name, text in (("retry", "deliver now: the IDs given, or every item"),
                       ("hold", "stop delivering items until released (postsuper -h)"),
                       ("release", "deliver held items again (postsuper -H)"),
                       ("requeue", "forget the retry schedule and deliver now "
                                   "(postsuper -r)")):
        config_dir_option(qs.add_parser(name, help=text)).add_argument("ids", nargs="*")
    flush = config_dir_option(qs.add_parser("flush", help="deliver every item now, or those "
                                            "with recipients in DOMAIN (postqueue -f/-s)"))
    flush.add_argument("domain", nargs="?")
    delete = config_dir_option(qs.add_parser("delete", help="remove items: IDs, ALL, or "
                                             "--domain D (postsuper -d)"))
    delete.add_argument("ids", nargs="*")
    delete.add_argument("--domain", help="every item with a pending recipient in DOMAIN")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tampu.cli import loaded, print_problems

    config = loaded(args)
    if config is None:
        return 2
    try:
        stores = make_stores(config)
    except ConfigError as exc:
        print_problems(exc)
        return 2
    try:
        return asyncio.run(_opened(args, config, stores))
    except TampuError as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 1


async def _opened(args: argparse.Namespace, config: Config, stores: Stores) -> int:
    await stores.open()
    try:
        return await _run(args, config, stores.queue)
    finally:
        await stores.close()


async def _items(store: QueueStore) -> list[QueueItem | tuple[str, str]]:
    out: list[QueueItem | tuple[str, str]] = []
    for qid in await store.ids():
        try:
            out.append(await store.load(qid))
        except QueueError as exc:
            if await store.exists(qid):
                out.append((qid, str(exc)))
    return out


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One item as ``tampu queue list`` and the console show it; ``error`` set (and ``item``
    None) for an item that cannot be read."""

    id: str
    item: QueueItem | None
    error: str = ""

    def age(self, now: float) -> str:
        return format_age(now - self.item.created) if self.item is not None else "-"

    @property
    def next_attempt(self) -> str:
        """``on hold``, ``next attempt 2024-05-01 12:04:00`` or ``next attempt now``."""
        if self.item is None:
            return "-"
        return "on hold" if self.item.held else f"next attempt {_when(self.item.next_attempt)}"

    @property
    def last_error(self) -> str:
        """The error of the latest attempt of a pending recipient (else of any recipient)."""
        if self.item is None:
            return self.error
        for group in (self.item.pending, self.item.recipients):
            errors = [r for r in group if r.last_error]
            if errors:
                return max(errors, key=lambda r: r.attempts).last_error
        return ""

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object (postqueue -j's fields)."""
        item = self.item
        if item is None:
            return {"queue_id": self.id, "error": self.error}
        return {
            "queue_id": item.id, "arrival_time": int(item.created), "size": item.size,
            "sender": item.mail_from, "held": item.held, "attempts": item.attempts,
            "next_attempt": int(item.next_attempt) or None, "origin": item.origin,
            "recipients": [{"address": r.address, "status": r.status.value,
                            "delay_reason": r.last_error} for r in item.recipients]}


async def queue_rows(store: QueueStore, limit: int | None = None) -> tuple[list[QueueRow], int]:
    """The oldest ``limit`` items (all if None) as rows, and how many items there are."""
    ids = await store.ids()
    rows = []
    for qid in ids[:limit] if limit is not None else ids:
        try:
            rows.append(QueueRow(qid, await store.load(qid)))
        except QueueError as exc:
            if await store.exists(qid):
                rows.append(QueueRow(qid, None, str(exc)))
    return rows, len(ids)


async def _run(args: argparse.Namespace, config: Config, store: QueueStore) -> int:
    command = args.queue_command
    if command == "list":
        return await list_queue(store, as_json=args.json)
    if command == "show":
        return await show(store, args.id, args)
    items = [i for i in await _items(store) if isinstance(i, QueueItem)]
    if command == "flush":
        ids = [i.id for i in items if args.domain is None or any(
            domain_of(r.address) == domain_of(f"x@{args.domain}") for r in i.pending)]
        return await request(config, store, "retry", ids, all_items=args.domain is None)
    if command == "delete":
        ids = list(args.ids)
        if args.domain:
            wanted = domain_of(f"x@{args.domain}")
            ids += [i.id for i in items if any(domain_of(r.address) == wanted
                                               for r in i.pending)]
        elif ids == ["ALL"]:
            ids = [i.id for i in items]
        if not ids:
            print("tampu: nothing to delete (give IDs, ALL or --domain)", file=sys.stderr)
            return 1
        return await request(config, store, "delete", ids)
    action = "retry" if command == "requeue" else command
    return await request(config, store, action, list(args.ids), all_items=not args.ids)


async def request(config: Config, store: QueueStore, action: str, ids: list[str],
                  *, all_items: bool = False) -> int:
    from tampu.cli import signal_server

    for qid in ids:
        if not valid_id(qid) or not await store.exists(qid):
            print(f"tampu: no queue item {qid}", file=sys.stderr)
            return 1
    if not ids and not all_items:
        print("queue is empty")
        return 0
    what = "every item" if all_items else " ".join(ids)
    if isinstance(store, SharedQueueStore):  # applied now, for every node
        count = await store.apply(action, [] if all_items else ids)
        print(f"{action} applied to {count} item(s) of the shared queue ({what})")
        return 0
    await store.request(action, [] if all_items else ids)
    if signal_server(config, signal.SIGUSR1):
        print(f"asked the server to {action} {what}")
        return 0
    # no server: what can be done on the store is done now; retries wait for the next start
    applied = await _apply_stopped(store)
    if action == "retry":
        print(f"no running server: {what} will be delivered at its next start")
    else:
        print(f"no running server: {action} applied to {applied} item(s)")
    return 0


async def _apply_stopped(store: QueueStore) -> int:
    n = 0
    for action, qid in await store.take_requests():
        targets = await store.ids() if qid == "all" else [qid]
        for key in targets:
            try:
                item = await store.load(key)
            except QueueError:
                continue
            if action == "delete":
                await store.remove(item)
            elif action in ("hold", "release"):
                item.held = action == "hold"
                await store.save_state(item)
            n += 1
    return n


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "now"


async def list_queue(store: QueueStore, *, as_json: bool) -> int:
    now = time.time()
    rows, _ = await queue_rows(store)
    holders = await store.holders() if isinstance(store, SharedQueueStore) else {}
    total = 0
    for row in rows:
        item = row.item
        if as_json:
            print(json.dumps({**row.to_json(), "node": holders[row.id][0]} if row.id in holders
                             else row.to_json()))
            if item is not None:
                total += item.size
            continue
        if item is None:
            print(f"{row.id}  (unreadable: {row.error})")
            continue
        total += item.size
        flag = "!" if item.held else " "
        print(f"{item.id}{flag} {item.size:>9}  {_when(item.created)}  "
              f"age={row.age(now)}  <{item.mail_from}>")
        state = row.next_attempt
        if item.id in holders:
            state += f"  being delivered by {holders[item.id][0]}"
        print(f"    attempts={item.attempts}  {state}  origin={item.origin}")
        for r in item.recipients:
            err = f"  ({r.last_error})" if r.last_error else ""
            print(f"    <{r.address}>  {r.status.value}{err}")
    if not as_json:
        n = sum(row.item is not None for row in rows)
        print(f"-- {total // 1024} KiB in {n} item(s)" if n else "queue is empty")
        corrupt = store.corrupt_count() if isinstance(store, FilesystemStore) else 0
        if corrupt and isinstance(store, FilesystemStore):
            print(f"{corrupt} unreadable item(s) set aside in {store.dir / 'corrupt'}")
    return 0


async def show(store: QueueStore, qid: str, args: argparse.Namespace) -> int:
    try:
        item = await store.load(qid)
        message = await store.read_message(item.id)
    except (QueueError, OSError) as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 1
    end = message.find(b"\r\n\r\n")
    head, body = (message[:end + 2], message[end + 4:]) if end >= 0 else (message, b"")
    if not (args.headers or args.body):
        print(json.dumps({**item.header_json(), **item.state_json()}, indent=2))
        if args.envelope:
            return 0
        print()
    out = head if args.headers else body if args.body else message
    sys.stdout.write(out.decode("utf-8", "replace"))
    return 0
