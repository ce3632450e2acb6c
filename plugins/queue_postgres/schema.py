"""The database schema of ``queue_postgres``: versioned migrations, applied by ``tampu db
migrate`` (or at start with ``auto_migrate = true``).

Each migration is one transaction; an advisory lock makes nodes that migrate at the same time
take turns. ``tampu_schema`` records what was applied, when and by which node. A node refuses
to start on a database older than the code (``run tampu db migrate``) or newer (an older
tampu must not write to a schema it does not know).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

MIGRATION_LOCK = 0x74616D7075  # "tampu": pg_advisory_xact_lock key


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "queue, state, nodes", """
CREATE FUNCTION tampu_now() RETURNS double precision LANGUAGE sql VOLATILE
    AS $$ SELECT extract(epoch FROM clock_timestamp())::double precision $$;

CREATE TABLE tampu_queue (
    id           text PRIMARY KEY,
    created      double precision NOT NULL,
    envelope     jsonb NOT NULL,
    state        jsonb,
    message      bytea NOT NULL,
    size         integer NOT NULL,
    held         boolean NOT NULL DEFAULT false,
    next_attempt double precision NOT NULL DEFAULT 0,
    retry_at     double precision NOT NULL DEFAULT 0,
    wake         boolean NOT NULL DEFAULT false,
    node         text,
    lease_until  double precision,
    lease_run    text,
    enqueued_by  text NOT NULL
);
COMMENT ON COLUMN tampu_queue.next_attempt IS
    'when a node may claim the item (epoch s): the retry time, or the lease expiry while leased';
COMMENT ON COLUMN tampu_queue.retry_at IS 'the retry time saved with the state';
COMMENT ON COLUMN tampu_queue.wake IS 'an operator asked for a retry while the item was leased';
COMMENT ON COLUMN tampu_queue.lease_run IS
    'the run of the node holding the lease (tampu_nodes.instance)';
ALTER TABLE tampu_queue ALTER COLUMN message SET STORAGE EXTERNAL;
CREATE INDEX tampu_queue_due ON tampu_queue (next_attempt) WHERE NOT held;
CREATE INDEX tampu_queue_node ON tampu_queue (node) WHERE node IS NOT NULL;

CREATE TABLE tampu_queue_corrupt (
    id       text PRIMARY KEY,
    reason   text NOT NULL,
    at       double precision NOT NULL,
    envelope jsonb,
    state    jsonb,
    message  bytea
);

CREATE TABLE tampu_state (
    ns      text NOT NULL,
    key     text NOT NULL,
    value   jsonb NOT NULL,
    expires double precision,
    PRIMARY KEY (ns, key)
);
CREATE INDEX tampu_state_expires ON tampu_state (expires) WHERE expires IS NOT NULL;

CREATE TABLE tampu_nodes (
    node      text PRIMARY KEY,
    started   double precision NOT NULL,
    heartbeat double precision NOT NULL,
    pid       integer NOT NULL,
    version   text NOT NULL,
    instance  text NOT NULL
);
"""),
)

LATEST = MIGRATIONS[-1].version

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS tampu_schema (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied     double precision NOT NULL,
    node        text NOT NULL
)"""


async def current_version(conn: Any) -> int:
    """The schema version of the database (0: nothing applied)."""
    exists = await conn.fetchval("SELECT to_regclass('tampu_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM tampu_schema"))


async def migrate(conn: Any, node: str) -> list[Migration]:
    """Apply every pending migration, each in its own transaction. Returns those applied."""
    applied = []
    for migration in MIGRATIONS:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(_VERSION_TABLE)
            done = await conn.fetchval("SELECT 1 FROM tampu_schema WHERE version = $1",
                                       migration.version)
            if done:
                continue
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO tampu_schema VALUES ($1, $2, $3, $4)",
                               migration.version, migration.description, time.time(), node)
            applied.append(migration)
    return applied
