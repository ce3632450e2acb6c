"""``tampu db``: the schema (``migrate``, ``status``) and moving a queue directory into
PostgreSQL (``import-queue``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from tampu.config import Config
from tampu.errors import ConfigError, QueueError, TampuError


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    from tampu.cli import config_dir_option

    p = config_dir_option(subparsers.add_parser(
        "db", help="the PostgreSQL database of queue_postgres (schema, nodes, import)"))
    sub = p.add_subparsers(dest="db_command", required=True)
    config_dir_option(sub.add_parser("migrate", help="create or upgrade the schema (every "
                                     "pending migration, each in one transaction)"))
    config_dir_option(sub.add_parser("status", help="schema version, queue size and the "
                                     "nodes' heartbeats"))
    imp = config_dir_option(sub.add_parser(
        "import-queue", help="move the items of <data_dir>/queue into the database (the "
        "server must be stopped); each is removed from the directory once committed"))
    imp.add_argument("--keep", action="store_true", help="leave the files in place")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tampu.cli import load, print_problems
    from tampu.plugins.queue_postgres import open_backend

    try:
        config = load(args)
        backend = open_backend(config, force=True)
    except ConfigError as exc:
        print_problems(exc)
        return 2
    from tampu.plugins.queue_postgres.db import Database

    assert isinstance(backend, Database)
    try:
        return asyncio.run(_run(args, config, backend))
    except TampuError as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 1


async def _connect(db: Any) -> Any:
    import asyncpg

    from tampu.plugins.queue_postgres.db import DB_ERRORS, DatabaseError, reason

    try:
        return await asyncpg.connect(db.settings.dsn, timeout=db.settings.connect_timeout)
    except DB_ERRORS as exc:
        raise DatabaseError(f"cannot connect to {db.where}: {reason(exc)}") from None


async def _run(args: argparse.Namespace, config: Config, db: Any) -> int:
    from tampu.plugins.queue_postgres import schema

    if args.db_command == "migrate":
        conn = await _connect(db)
        try:
            before = await schema.current_version(conn)
            applied = await schema.migrate(conn, db.node)
        finally:
            await conn.close()
        for m in applied:
            print(f"applied migration {m.version}: {m.description}")
        print(f"schema of {db.where} is at version {schema.LATEST}" + (
            " (already)" if not applied and before == schema.LATEST else ""))
        return 0
    if args.db_command == "status":
        return await _status(db)
    return await _import(config, db, keep=args.keep)


async def _status(db: Any) -> int:
    from tampu.plugins.queue_postgres import schema

    conn = await _connect(db)
    try:
        version = await schema.current_version(conn)
        print(f"database {db.where}: schema version {version} (this tampu: {schema.LATEST})")
        if version == 0:
            print("run `tampu db migrate` to create the schema")
            return 1
        row = await conn.fetchrow(
            "SELECT count(*) AS items, count(*) FILTER (WHERE lease_until > tampu_now()) AS "
            "leased, count(*) FILTER (WHERE held) AS held, count(*) FILTER (WHERE NOT held "
            "AND next_attempt <= tampu_now()) AS due FROM tampu_queue")
        print(f"queue: {row['items']} item(s), {row['due']} due, {row['leased']} being "
              f"delivered, {row['held']} on hold")
        now = await conn.fetchval("SELECT tampu_now()")
        for node in await conn.fetch("SELECT n.node, n.heartbeat, n.pid, n.version, "
                                     "(SELECT count(*) FROM tampu_queue q WHERE q.node = n.node "
                                     "AND q.lease_until > tampu_now()) AS leases "
                                     "FROM tampu_nodes n ORDER BY n.node"):
            age = now - node["heartbeat"]
            print(f"node {node['node']}: heartbeat {age:.0f}s ago, pid {node['pid']}, tampu "
                  f"{node['version']}, {node['leases']} lease(s)")
    finally:
        await conn.close()
    return 0 if version == schema.LATEST else 1


async def _import(config: Config, db: Any, *, keep: bool) -> int:
    from tampu.cli import PIDFILE
    from tampu.store_files import FilesystemStore

    try:
        pid = int((config.data_dir / PIDFILE).read_text().strip())
        os.kill(pid, 0)
        print(f"tampu: a server runs (pid {pid}); stop it before importing its queue",
              file=sys.stderr)
        return 1
    except (OSError, ValueError):
        pass
    files = FilesystemStore(config.data_dir / "queue", 1)
    ids = await files.recover()  # after a crash, items may be only in the queue log
    if not ids:
        await files.close()
        print(f"nothing to import: {files.dir} holds no item")
        return 0
    await db.open()
    moved = skipped = 0
    start = time.monotonic()
    try:
        for at in range(0, len(ids), 100):
            batch = []
            for qid in ids[at:at + 100]:
                try:
                    item = await files.load(qid)
                    batch.append((item, await files.read_message(qid)))
                except QueueError as exc:
                    print(f"tampu: {qid} not imported: {exc}", file=sys.stderr)
                    skipped += 1
            new = await db.queue.import_items(batch)
            skipped += len(batch) - new
            moved += new
            if not keep:
                for item, _ in batch:
                    await files.remove(item)
    finally:
        await db.close()
        await files.close()
    print(f"imported {moved} item(s) into {db.where} in {time.monotonic() - start:.1f}s"
          + (f"; {skipped} skipped (unreadable, or already there)" if skipped else "")
          + ("" if keep else f"; removed from {files.dir}"))
    return 0
