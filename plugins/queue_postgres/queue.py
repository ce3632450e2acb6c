"""The PostgreSQL queue store: one row per item in ``tampu_queue``, shared by every node.

A row holds the envelope (``envelope``, as enqueued), the delivery state (``state``), the
message bytes (``message``, stored out of line, uncompressed) and the columns that schedule
it: ``held``, ``next_attempt`` (when a node may claim it), ``retry_at`` (the retry time saved
with the state), ``node`` and ``lease_until`` (who is delivering it, until when).

* ``put``: one INSERT, committed with ``synchronous_commit = on`` before it returns (so before
  the ``250``). Puts that arrive while earlier ones are being committed are written together
  by the next INSERT (``batch_puts``): one commit, one WAL flush for all of them.
* ``claim``: ``FOR UPDATE SKIP LOCKED`` over due rows; a claimed row gets this node's name and
  a lease, and ``next_attempt`` = the lease's end, so that a row whose node died becomes due
  again by itself when its lease ends. The heartbeat renews the leases this process holds.
* ``release``: clears the lease; the row is due at ``retry_at`` (now, if an operator asked for
  a retry meanwhile).
* ``save_state`` writes only while this node holds the lease (or nobody does): a node that
  lost its lease cannot overwrite the state of the node that took the item over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tampu.errors import QueueError
from tampu.item import QueueItem
from tampu.store import new_queue_id, valid_id

if TYPE_CHECKING:
    from tampu.plugins.queue_postgres.db import Database

log = logging.getLogger("tampu.plugins.queue_postgres")

ACTIONS = ("retry", "delete", "hold", "release")
MAX_BATCH = 200

_INSERT = """
WITH new AS (
    INSERT INTO tampu_queue (id, created, envelope, state, message, size, held, next_attempt,
                             retry_at, node, lease_until, lease_run, enqueued_by)
    SELECT r.id, r.created, r.envelope::jsonb, r.state::jsonb, r.message, r.size, r.held,
           CASE WHEN r.lease THEN tampu_now() + $12 ELSE r.next_attempt END, r.next_attempt,
           CASE WHEN r.lease THEN $13 END,
           CASE WHEN r.lease THEN tampu_now() + $12 END, CASE WHEN r.lease THEN $14 END, $13
    FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[], $5::bytea[], $6::int[],
                $7::bool[], $8::float8[], $9::bool[])
         AS r(id, created, envelope, state, message, size, held, next_attempt, lease)
    ON CONFLICT (id) DO NOTHING
    RETURNING node, id),
told AS (SELECT pg_notify($11, 'new') FROM new WHERE node IS NULL LIMIT 1)
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM told),
       coalesce((SELECT array_agg(id) FROM new), '{}') @> $10::text[]
"""
"""Rows as arrays (one statement for a whole batch); ``$10`` the IDs that must be new."""

_SAVE = """
UPDATE tampu_queue SET state = $2::jsonb, retry_at = $3
WHERE id = $1 AND (node IS NULL OR node = $4)
"""

_CLAIM = """
WITH due AS (
    SELECT id FROM tampu_queue
    WHERE NOT held AND next_attempt <= tampu_now()
    ORDER BY next_attempt
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
UPDATE tampu_queue q SET node = $2, lease_until = tampu_now() + $3, lease_run = $4,
                         next_attempt = tampu_now() + $3, wake = false
FROM due WHERE q.id = due.id
RETURNING q.id, q.created
"""

_RELEASE = """
WITH gone AS (
    UPDATE tampu_queue SET node = NULL, lease_until = NULL, lease_run = NULL, wake = false,
        next_attempt = CASE WHEN wake THEN tampu_now() ELSE retry_at END
    WHERE {which} AND node = $2
    RETURNING next_attempt),
told AS (SELECT pg_notify($3, 'due') FROM gone WHERE next_attempt <= tampu_now() LIMIT 1)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM told)
"""

_RELEASE_IDS = _RELEASE.format(which="id = ANY($1::text[])")
_RELEASE_NODE = _RELEASE.format(
    which="cardinality($1::text[]) = 0 AND lease_run IS DISTINCT FROM $4")
"""Every lease of this node from a previous run (``$1`` empty, ``$4`` this run): not this
run's, which may already hold leases (recovery runs in the background while mail comes in)."""

_MEASURE = """
WITH now AS (SELECT tampu_now() AS t)
SELECT count(*) AS items,
       count(*) FILTER (WHERE NOT held AND next_attempt <= now.t) AS due,
       coalesce(now.t - min(next_attempt) FILTER (WHERE NOT held AND next_attempt <= now.t),
                0) AS lag,
       coalesce(now.t - min(created), 0) AS oldest,
       count(*) FILTER (WHERE lease_until > now.t) AS leased,
       count(*) FILTER (WHERE node = $1 AND lease_until > now.t) AS mine
FROM tampu_queue, now GROUP BY now.t
"""


class _Put:
    __slots__ = ("item", "message", "lease", "future")

    def __init__(self, item: QueueItem, message: bytes, lease: bool,
                 future: asyncio.Future[None]) -> None:
        self.item, self.message, self.lease, self.future = item, message, lease, future


class PostgresQueueStore:
    """The shared queue (a :class:`tampu.backends.SharedQueueStore`)."""

    def __init__(self, db: Database, max_items: int) -> None:
        self.db = db
        self.max_items = max_items
        self.node = db.node
        self.lease_on_put = False
        self.claim_batch = db.settings.claim_batch
        self.max_in_flight = db.settings.max_in_flight
        self.poll_interval = db.settings.poll_interval
        self.leased: set[str] = set()
        """Items this process holds a lease on (renewed by the heartbeat)."""
        self._estimate = 0
        self._pending: list[_Put] = []
        self._flights: set[asyncio.Task[None]] = set()
        self._gauges: dict[str, tuple[str, float]] = {}

    new_id = staticmethod(new_queue_id)

    @property
    def lease_seconds(self) -> float:
        return self.db.settings.lease_seconds

    def _conn(self, what: str) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.db.connection_for(QueueError, "queue", what)

    def full(self) -> bool:
        """From the count the heartbeat measures plus this process's puts since (no query)."""
        return self._estimate >= self.max_items

    # ------------------------------------------------------------------ writing

    async def put(self, item: QueueItem, message: bytes) -> None:
        item.size = len(message)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Put(item, message, self.lease_on_put, future))
        settings = self.db.settings
        flights = settings.put_flights if settings.batch_puts else len(self._pending) + 1
        if len(self._flights) < flights:
            task = asyncio.get_running_loop().create_task(self._flush())
            self._flights.add(task)
            task.add_done_callback(self._flights.discard)
        await future

    async def _flush(self) -> None:
        """Write what is pending, a batch per statement, until nothing is."""
        limit = MAX_BATCH if self.db.settings.batch_puts else 1
        while self._pending:
            batch, self._pending = self._pending[:limit], self._pending[limit:]
            try:
                await self._insert([(p.item, p.message, p.lease) for p in batch])
            except BaseException as exc:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc if isinstance(exc, Exception) else
                                               QueueError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            for p in batch:
                if p.lease:
                    self.leased.add(p.item.id)
                if not p.future.done():
                    p.future.set_result(None)
            self._estimate += len(batch)

    async def flush_pending(self) -> None:
        if self._flights:
            await asyncio.wait(list(self._flights), timeout=30)

    async def _insert(self, rows: list[tuple[QueueItem, bytes, bool]], *,
                      with_state: bool = False, must_be_new: bool = True) -> int:
        """Insert rows in one statement (one transaction). Returns how many were new."""
        ids = [i.id for i, _, _ in rows]
        args = (
            ids, [i.created for i, _, _ in rows],
            [json.dumps({**i.header_json(), "size": len(m)}, separators=(",", ":"))
             for i, m, _ in rows],
            [json.dumps(i.state_json(), separators=(",", ":")) if with_state else None
             for i, _, _ in rows],
            [m for _, m, _ in rows], [len(m) for _, m, _ in rows],
            [i.held if with_state else False for i, _, _ in rows],
            [i.next_attempt if with_state else 0.0 for i, _, _ in rows],
            [lease for _, _, lease in rows], ids if must_be_new else [],
            "tampu_queue", self.lease_seconds, self.node, self.db.instance)
        async with self._conn("cannot store the message") as conn:
            count, _notified, all_new = await conn.fetchrow(_INSERT, *args)
        if must_be_new and not all_new:
            raise QueueError("queue ID already in the database")
        return int(count)

    async def import_items(self, rows: list[tuple[QueueItem, bytes]]) -> int:
        """Items from another store (``tampu db import-queue``), with their state, due now;
        IDs already in the database are skipped. Returns how many were new."""
        for item, _ in rows:
            item.next_attempt = 0.0
        return await self._insert([(i, m, False) for i, m in rows], with_state=True,
                                  must_be_new=False)

    async def save_state(self, item: QueueItem) -> None:
        body = json.dumps(item.state_json(), separators=(",", ":"))
        async with self._conn("cannot save the delivery state") as conn:
            done = await conn.execute(_SAVE, item.id, body, item.next_attempt, self.node)
        if done == "UPDATE 0" and item.id in self.leased:
            log.warning("qid=%s: state not saved: the item was deleted or another node "
                        "took it over", item.id)

    async def remove(self, item: QueueItem) -> None:
        async with self._conn("cannot remove the item") as conn:
            await conn.execute("DELETE FROM tampu_queue WHERE id = $1", item.id)
        self.leased.discard(item.id)
        self._estimate = max(0, self._estimate - 1)

    # ------------------------------------------------------------------ reading

    async def exists(self, item_id: str) -> bool:
        if not valid_id(item_id):
            return False
        async with self._conn("cannot read the queue") as conn:
            return bool(await conn.fetchval("SELECT 1 FROM tampu_queue WHERE id = $1",
                                            item_id))

    async def load(self, item_id: str) -> QueueItem:
        if not valid_id(item_id):
            raise QueueError(f"not a queue ID: {item_id!r}")
        async with self._conn("cannot read the queue") as conn:
            row = await conn.fetchrow("SELECT envelope, state, size, held FROM tampu_queue "
                                      "WHERE id = $1", item_id)
        if row is None:
            raise QueueError(f"no queue item {item_id}")
        try:
            item = QueueItem.from_json(json.loads(row["envelope"]))
            if row["state"] is not None:
                item.apply_state(json.loads(row["state"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QueueError(f"corrupt queue item {item_id}: {exc}") from exc
        item.size = int(row["size"])
        item.held = bool(row["held"])  # the column: an operator's hold wins over the state
        return item

    def defer_sync(self, item_id: str, path: Path) -> bool:
        """No: a delivery backend syncs its own files (the queue is in the database)."""
        return False

    async def read_message(self, item_id: str) -> bytes:
        async with self._conn("cannot read the message") as conn:
            data = await conn.fetchval("SELECT message FROM tampu_queue WHERE id = $1",
                                       item_id)
        if data is None:
            raise QueueError(f"no queue item {item_id}")
        return bytes(data)

    async def ids(self) -> list[str]:
        async with self._conn("cannot read the queue") as conn:
            rows = await conn.fetch("SELECT id FROM tampu_queue ORDER BY created, id")
        return [r["id"] for r in rows]

    async def recover(self) -> list[str]:
        """At start: leases this node held before (it crashed or was killed) are given up
        now instead of at their expiry (unless another live process uses this node's name).
        Nothing to load: the claim loop takes due items."""
        if self.db.name_in_use:
            return []
        async with self._conn("cannot read the queue") as conn:
            count, _ = await conn.fetchrow(_RELEASE_NODE, [], self.node, "tampu_queue",
                                           self.db.instance)
            self._estimate = int(await conn.fetchval("SELECT count(*) FROM tampu_queue"))
        if count:
            log.info("queue_postgres: released %d lease(s) of this node's previous run", count)
        return []

    async def quarantine(self, item_id: str, reason: str) -> None:
        log.error("qid=%s: %s; moved to tampu_queue_corrupt", item_id, reason)
        async with self._conn("cannot quarantine") as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO tampu_queue_corrupt (id, reason, at, envelope, state, message) "
                "SELECT id, $2, tampu_now(), envelope, state, message FROM tampu_queue "
                "WHERE id = $1 ON CONFLICT (id) DO NOTHING", item_id, reason)
            await conn.execute("DELETE FROM tampu_queue WHERE id = $1", item_id)
        self.leased.discard(item_id)

    async def corrupt_count(self) -> int:
        async with self._conn("cannot read the queue") as conn:
            return int(await conn.fetchval("SELECT count(*) FROM tampu_queue_corrupt"))

    # ------------------------------------------------------------------ claims and leases

    async def claim(self, limit: int) -> list[str]:
        if limit <= 0:
            return []
        async with self._conn("cannot claim items") as conn:
            rows = await conn.fetch(_CLAIM, limit, self.node, self.lease_seconds,
                                    self.db.instance)
        rows = sorted(rows, key=lambda r: (r["created"], r["id"]))
        self.leased.update(r["id"] for r in rows)
        return [r["id"] for r in rows]

    async def release(self, item_id: str) -> None:
        if item_id not in self.leased:
            return
        self.leased.discard(item_id)
        async with self._conn("cannot release a lease") as conn:
            await conn.fetchrow(_RELEASE_IDS, [item_id], self.node, "tampu_queue")

    async def release_all(self) -> None:
        """Give up every lease of this process (shutdown): other nodes take the items now."""
        if not self.leased:
            return
        ids, self.leased = list(self.leased), set()
        async with self._conn("cannot release leases") as conn:
            count, _ = await conn.fetchrow(_RELEASE_IDS, ids, self.node, "tampu_queue")
        log.info("queue_postgres: released %d lease(s) at shutdown", count)

    async def renew(self, conn: Any) -> None:
        """Extend this process's leases (the heartbeat); forget those lost meanwhile."""
        if not self.leased:
            return
        ids = list(self.leased)
        rows = await conn.fetch(
            "UPDATE tampu_queue SET lease_until = tampu_now() + $3, "
            "next_attempt = tampu_now() + $3 WHERE id = ANY($1::text[]) AND node = $2 "
            "RETURNING id", ids, self.node, self.lease_seconds)
        kept = {r["id"] for r in rows}
        for lost in set(ids) - kept:
            if lost in self.leased:  # else released meanwhile
                self.leased.discard(lost)
                log.warning("qid=%s: lease lost (deleted, or taken over after expiring)", lost)

    async def wait_due(self, at_most: float) -> None:
        try:
            await asyncio.wait_for(self.db.due.wait(), at_most)
        except TimeoutError:
            pass
        self.db.due.clear()

    async def holders(self) -> dict[str, tuple[str, float]]:
        async with self._conn("cannot read the queue") as conn:
            rows = await conn.fetch("SELECT id, node, lease_until FROM tampu_queue "
                                    "WHERE lease_until > tampu_now()")
        return {r["id"]: (r["node"], float(r["lease_until"])) for r in rows}

    # ------------------------------------------------------------------ operators

    async def apply(self, action: str, ids: list[str]) -> int:
        if action not in ACTIONS:
            raise QueueError(f"unknown queue action {action!r}")
        for item_id in ids:
            if not valid_id(item_id):
                raise QueueError(f"not a queue ID: {item_id!r}")
        live = "lease_until > tampu_now()"
        which = "(cardinality($1::text[]) = 0 OR id = ANY($1::text[]))"
        sql = {
            "retry": f"UPDATE tampu_queue SET wake = true, next_attempt = CASE WHEN {live} "
                     f"THEN next_attempt ELSE tampu_now() END WHERE {which} AND NOT held",
            "hold": f"UPDATE tampu_queue SET held = true WHERE {which} AND NOT held",
            "release": f"UPDATE tampu_queue SET held = false, next_attempt = CASE WHEN {live} "
                       f"THEN next_attempt ELSE tampu_now() END WHERE {which} AND held",
            "delete": f"DELETE FROM tampu_queue WHERE {which}",
        }[action]
        async with self._conn(f"cannot {action}") as conn, conn.transaction():
            done = await conn.execute(sql, ids)
            count = int(done.split()[-1])
            if count and action in ("retry", "release"):
                await self.db.notify(conn)
        return count

    async def request(self, action: str, ids: list[str]) -> None:
        """Shared stores apply requests at once (every node sees them)."""
        await self.apply(action, ids)

    async def take_requests(self) -> list[tuple[str, str]]:
        return []

    # ------------------------------------------------------------------ health

    async def measure(self, conn: Any) -> None:
        row = await conn.fetchrow(_MEASURE, self.node)
        items = int(row["items"]) if row is not None else 0
        self._estimate = items
        self._gauges = {
            "tampu_queue_items": ("Items in the queue (all nodes).", float(items)),
            "tampu_queue_oldest_age_seconds": ("Age of the oldest queue item (0 when empty).",
                                               float(row["oldest"]) if row else 0.0),
            "tampu_queue_due_items": ("Items due for delivery that no node has claimed yet.",
                                      float(row["due"]) if row else 0.0),
            "tampu_queue_lag_seconds": ("How long the oldest due, unclaimed item has waited "
                                        "past its due time (0: none waiting).",
                                        float(row["lag"]) if row else 0.0),
            "tampu_queue_leases": ("Items under a live lease (all nodes).",
                                   float(row["leased"]) if row else 0.0),
            "tampu_queue_node_leases": ("Items this node is delivering (its live leases).",
                                        float(row["mine"]) if row else 0.0),
        }

    def gauges(self) -> dict[str, tuple[str, float]]:
        out = dict(self._gauges)
        out["tampu_store_up"] = ("1 when the last heartbeat reached the queue database.",
                                 1.0 if self.db.healthy else 0.0)
        out["tampu_cluster_nodes"] = ("Nodes whose heartbeat is recent (all nodes).",
                                      float(self.db.nodes_alive))
        out["tampu_store_heartbeat_age_seconds"] = (
            "Seconds since this process measured the queue database.",
            time.time() - self.db._last_gauges if self.db._last_gauges else 0.0)
        return out
