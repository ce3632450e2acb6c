"""The connection to PostgreSQL of one process: a pool, a LISTEN connection and a heartbeat.

:class:`Database` is the ``postgres`` store backend (:class:`tampu.backends.StoreBackend`):
it makes the queue store and the state store, which share its pool. ``open`` connects, checks
the schema version (or migrates, with ``auto_migrate``), LISTENs on ``tampu_queue`` and starts
the heartbeat; the heartbeat renews this process's leases, records the node in
``tampu_nodes``, measures the gauges of the metrics plugin and removes expired state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg

from tampu import __version__
from tampu.errors import QueueError, TampuError
from tampu.plugins.queue_postgres import schema

if TYPE_CHECKING:
    from tampu.plugins.queue_postgres import QueuePostgresSettings
    from tampu.plugins.queue_postgres.queue import PostgresQueueStore
    from tampu.plugins.queue_postgres.state import PostgresStateStore

log = logging.getLogger("tampu.plugins.queue_postgres")

CHANNEL = "tampu_queue"
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
    OSError, TimeoutError)
"""What a database call may raise: each becomes a QueueError or StateError with a message that
names the database (never the DSN: it may hold the password)."""


class DatabaseError(TampuError):
    """The database cannot be used (unreachable, wrong schema version)."""


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN, for logs: never its password."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "(unparsable DSN)"
    if parts.scheme in ("postgres", "postgresql"):
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"{user}{host}{port}{parts.path or '/'}"
    words = dict(w.split("=", 1) for w in dsn.split() if "=" in w)  # key=value form
    return (f"{words.get('user', '') + '@' if 'user' in words else ''}"
            f"{words.get('host', 'localhost')}:{words.get('port', '5432')}/"
            f"{words.get('dbname', '')}")


class Database:
    """The ``postgres`` backend of one process."""

    def __init__(self, settings: QueuePostgresSettings, node: str, max_items: int) -> None:
        from tampu.plugins.queue_postgres.queue import PostgresQueueStore
        from tampu.plugins.queue_postgres.state import PostgresStateStore

        self.settings = settings
        self.node = node
        self.where = describe_dsn(settings.dsn)
        self.pool: asyncpg.Pool | None = None
        self.queue: PostgresQueueStore = PostgresQueueStore(self, max_items)
        self.state: PostgresStateStore = PostgresStateStore(self)
        self.due = asyncio.Event()
        self.healthy = False
        self.instance = f"{socket.gethostname()}/{os.getpgid(0)}"
        """This run of the node (its reception workers share the process group), told apart
        from another process that uses the same node name."""
        self.name_in_use = False
        """Another live process had this node name at start (see :meth:`become_node`)."""
        self.serving = False
        """Set in a serving process (by the plugin at start): only those are nodes in
        ``tampu_nodes`` (commands such as ``tampu queue`` are not)."""
        self.nodes_alive = 0
        self._listener: Any = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_cleanup = 0.0
        self._last_gauges = 0.0

    # ------------------------------------------------------------------ StoreBackend

    def queue_store(self) -> PostgresQueueStore:
        return self.queue

    def state_store(self) -> PostgresStateStore:
        return self.state

    async def open(self) -> None:
        s = self.settings
        try:
            self.pool = await asyncpg.create_pool(
                s.dsn, min_size=1, max_size=s.pool_size, timeout=s.connect_timeout,
                command_timeout=s.command_timeout, server_settings={
                    "application_name": f"tampu {self.node}"[:63],
                    "synchronous_commit": "on"})
        except DB_ERRORS as exc:
            raise DatabaseError(f"queue_postgres: cannot connect to {self.where}: "
                                f"{reason(exc)}") from None
        try:
            async with self.pool.acquire() as conn:
                version = await schema.current_version(conn)
                if version < schema.LATEST and s.auto_migrate:
                    for m in await schema.migrate(conn, self.node):
                        log.info("queue_postgres: applied migration %d (%s)", m.version,
                                 m.description)
                    version = await schema.current_version(conn)
            if version != schema.LATEST:
                raise DatabaseError(
                    f"queue_postgres: the database {self.where} has schema version {version}, "
                    f"this tampu needs {schema.LATEST}: "
                    + ("run `tampu db migrate`" if version < schema.LATEST else
                       "it was migrated by a newer tampu"))
            await self.beat()
            await self._listen()
        except BaseException:
            await self.pool.close()
            self.pool = None
            raise
        self._heartbeat = asyncio.get_running_loop().create_task(self._run_heartbeat(),
                                                                 name="queue_postgres")
        log.info("queue_postgres: connected to %s as node %s", self.where, self.node)

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        await self.queue.flush_pending()
        try:
            await self.queue.release_all()
        except QueueError as exc:
            log.warning("queue_postgres: leases not released at shutdown (they expire): %s",
                        exc)
        if self._listener is not None:
            with contextlib.suppress(*DB_ERRORS):
                await self._listener.close(timeout=5)
            self._listener = None
        if self.pool is not None:
            with contextlib.suppress(*DB_ERRORS):
                await asyncio.wait_for(self.pool.close(), 10)
            self.pool = None

    # ------------------------------------------------------------------ calls

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; DatabaseError when the backend is not open."""
        if self.pool is None:
            raise DatabaseError(f"queue_postgres: not connected to {self.where}")
        async with self.pool.acquire() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def connection_for(self, error: type[Exception], store: str,
                             what: str) -> AsyncIterator[Any]:
        """:meth:`connection` for a store: any database failure becomes ``error`` (the
        store's QueueError or StateError) naming the ``store`` ("queue", "state"), where,
        and ``what`` was being done."""
        try:
            async with self.connection() as conn:
                yield conn
        except DB_ERRORS as exc:
            raise error(f"{store} database {self.where}: {what}: {reason(exc)}") from None
        except DatabaseError as exc:
            raise error(str(exc)) from None

    # ------------------------------------------------------------------ notifications

    async def _listen(self) -> None:
        assert self.pool is not None
        conn = await asyncpg.connect(self.settings.dsn, timeout=self.settings.connect_timeout,
                                     server_settings={"application_name":
                                                      f"tampu {self.node} listen"[:63]})
        await conn.add_listener(CHANNEL, self._notified)
        self._listener = conn

    def _notified(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self.due.set()

    async def notify(self, conn: Any, what: str = "due") -> None:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, what)

    # ------------------------------------------------------------------ heartbeat

    @property
    def beat_interval(self) -> float:
        return max(0.2, min(self.settings.lease_seconds / 3, 10.0))

    async def _run_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.beat_interval)
            try:
                await self.beat()
                if self._listener is None or self._listener.is_closed():
                    self._listener = None
                    await self._listen()
                    self.due.set()  # notifications may have been missed meanwhile
            except DB_ERRORS as exc:
                if self.healthy:
                    log.error("queue_postgres: %s unreachable: %s; leases will expire if this "
                              "lasts %.0fs", self.where, reason(exc),
                              self.settings.lease_seconds)
                self.healthy = False
            except Exception:  # the heartbeat must survive anything
                log.exception("queue_postgres: heartbeat failed")

    async def become_node(self) -> None:
        """This process serves as the node (the plugin's start-up): it shows in
        ``tampu_nodes``. If another process of another run sent a heartbeat under the same
        name within ``lease_seconds``, names are not unique: say so, and leave that name's
        old leases to expire instead of releasing them (they may be that process's)."""
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT tampu_now() - heartbeat AS age, instance, pid "
                                      "FROM tampu_nodes WHERE node = $1", self.node)
        if row is not None and row["instance"] != self.instance and \
                row["age"] < self.settings.lease_seconds:
            self.name_in_use = True
            log.error("queue_postgres: node name %r was in use %.0fs ago (pid %s): every node "
                      "needs its own [server] node; if that process is this node's previous "
                      "run, ignore this", self.node, row["age"], row["pid"])
        self.serving = True
        self._last_gauges = 0.0  # measure again, now that this node counts
        await self.beat()

    async def beat(self) -> None:
        """One heartbeat now (renew leases, record the node, measure)."""
        now = time.time()
        async with self.connection() as conn:
            await self.queue.renew(conn)
            if self.serving:
                await conn.execute(
                    "INSERT INTO tampu_nodes (node, started, heartbeat, pid, version, instance) "
                    "VALUES ($1, $2, tampu_now(), $3, $4, $5) ON CONFLICT (node) DO UPDATE SET "
                    "heartbeat = tampu_now(), pid = EXCLUDED.pid, version = EXCLUDED.version, "
                    "instance = EXCLUDED.instance", self.node, now, os.getpid(), __version__,
                    self.instance)
            if now - self._last_gauges >= min(10.0, self.beat_interval * 2):
                self._last_gauges = now
                await self.queue.measure(conn)
                self.nodes_alive = int(await conn.fetchval(
                    "SELECT count(*) FROM tampu_nodes WHERE heartbeat > tampu_now() - $1",
                    self.beat_interval * 3))
            if now - self._last_cleanup >= 60:
                self._last_cleanup = now
                await self.state.cleanup(conn)
        if not self.healthy:
            self.healthy = True
            log.info("queue_postgres: %s reachable", self.where)


def reason(exc: BaseException) -> str:
    """The first line of a database error (asyncpg's messages never hold the DSN)."""
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]

