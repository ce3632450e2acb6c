"""The PostgreSQL state store: ``tampu_state (ns, key, value jsonb, expires)``, shared by every
node (a :class:`tampu.state_store.StateStore`).

Expiry is judged by the database's clock (``tampu_now()``), so that nodes whose clocks differ
still agree on when a counter's window ends. Expired rows are ignored at once and deleted by
the heartbeat a minute later. Counters are one ``INSERT ... ON CONFLICT DO UPDATE``: atomic
across nodes without locks held between calls.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

from tampu.errors import StateError

if TYPE_CHECKING:
    from tampu.plugins.queue_postgres.db import Database

_LIVE = "(expires IS NULL OR expires > tampu_now())"

_INCR = """
INSERT INTO tampu_state AS s (ns, key, value, expires)
VALUES ($1, $2, to_jsonb($3::bigint), tampu_now() + $4)
ON CONFLICT (ns, key) DO UPDATE SET
    value = CASE WHEN s.expires IS NOT NULL AND s.expires <= tampu_now() THEN EXCLUDED.value
                 ELSE to_jsonb(s.value::bigint + $3::bigint) END,
    expires = CASE WHEN s.expires IS NOT NULL AND s.expires <= tampu_now() THEN EXCLUDED.expires
                   ELSE s.expires END
RETURNING value::bigint
"""

_INSERT_IF_ABSENT = """
INSERT INTO tampu_state AS s (ns, key, value, expires)
VALUES ($1, $2, $3::jsonb, tampu_now() + $4)
ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value, expires = EXCLUDED.expires
    WHERE s.expires IS NOT NULL AND s.expires <= tampu_now()
RETURNING 1
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class PostgresStateStore:
    """State every node shares."""

    shared = True

    def __init__(self, db: Database) -> None:
        self.db = db

    def _conn(self, what: str) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.db.connection_for(StateError, "state", what)

    async def get(self, ns: str, key: str) -> Any | None:
        async with self._conn("cannot read") as conn:
            raw = await conn.fetchval(f"SELECT value FROM tampu_state WHERE ns = $1 AND key = $2 "
                                      f"AND {_LIVE}", ns, key)
        return json.loads(raw) if raw is not None else None

    async def put(self, ns: str, key: str, value: Any, *, ttl: float | None = None) -> None:
        async with self._conn("cannot write") as conn:
            await conn.execute(
                "INSERT INTO tampu_state (ns, key, value, expires) VALUES ($1, $2, $3::jsonb, "
                "tampu_now() + $4) ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value, "
                "expires = EXCLUDED.expires", ns, key, _dumps(value), ttl)

    async def delete(self, ns: str, key: str) -> bool:
        async with self._conn("cannot delete") as conn:
            done = await conn.execute(f"DELETE FROM tampu_state WHERE ns = $1 AND key = $2 "
                                      f"AND {_LIVE}", ns, key)
        return bool(done != "DELETE 0")

    async def incr(self, ns: str, key: str, by: int = 1, *, ttl: float) -> int:
        async with self._conn("cannot count") as conn:
            return int(await conn.fetchval(_INCR, ns, key, by, ttl))

    async def compare_and_set(self, ns: str, key: str, expected: Any | None, new: Any | None,
                              *, ttl: float | None = None) -> bool:
        async with self._conn("cannot update") as conn:
            if expected is None and new is None:
                return await conn.fetchval(f"SELECT 1 FROM tampu_state WHERE ns = $1 AND "
                                           f"key = $2 AND {_LIVE}", ns, key) is None
            if expected is None:
                return await conn.fetchval(_INSERT_IF_ABSENT, ns, key, _dumps(new),
                                           ttl) is not None
            if new is None:
                return await conn.fetchval(
                    f"DELETE FROM tampu_state WHERE ns = $1 AND key = $2 AND value = $3::jsonb "
                    f"AND {_LIVE} RETURNING 1", ns, key, _dumps(expected)) is not None
            return await conn.fetchval(
                f"UPDATE tampu_state SET value = $4::jsonb, expires = tampu_now() + $5 "
                f"WHERE ns = $1 AND key = $2 AND value = $3::jsonb AND {_LIVE} RETURNING 1",
                ns, key, _dumps(expected), _dumps(new), ttl) is not None

    async def items(self, ns: str) -> list[tuple[str, Any]]:
        async with self._conn("cannot read") as conn:
            rows = await conn.fetch(f"SELECT key, value FROM tampu_state WHERE ns = $1 AND "
                                    f"{_LIVE} ORDER BY key", ns)
        return [(r["key"], json.loads(r["value"])) for r in rows]

    async def cleanup(self, conn: Any) -> None:
        """Delete rows that expired over a minute ago (a thousand at a time)."""
        await conn.execute("DELETE FROM tampu_state WHERE ctid = ANY(ARRAY(SELECT ctid FROM "
                           "tampu_state WHERE expires < tampu_now() - 60 LIMIT 1000))")
