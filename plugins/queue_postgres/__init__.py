"""``queue_postgres``: the queue and the policy state in PostgreSQL, shared by several nodes.

With ``[server] queue_store = "postgres"`` every node stores the mail it accepts in one
database (the row is committed before the ``250``) and delivers whatever is due, claimed under
a lease (``FOR UPDATE SKIP LOCKED``); a node that dies loses its leases when they expire and
another node delivers its items. With ``state_store = "postgres"`` (the default once the
queue is there) domaininfo levels, rate-limit and AUTH-failure counters and greylisting are
the same whichever node a client reaches. ``tampu db migrate`` creates and upgrades the
schema; ``tampu db status`` shows it and the nodes; ``tampu db import-queue`` moves a single
server's queue directory into the database. See docs/scaling.md.

A built-in plugin with an optional dependency (``pip install 'tampu[postgres]'`` for
asyncpg): importing this module does not import asyncpg, so tampu without it works as before.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from tampu import PluginContext, PluginSettings, ServerContext, hookimpl
from tampu.config import Config
from tampu.errors import ConfigError

if TYPE_CHECKING:
    from tampu.backends import RegisterBackend, StoreBackend

NAME = "queue_postgres"
BACKEND = "postgres"


class QueuePostgresSettings(PluginSettings):
    dsn: str = Field(default="", description="libpq connection string or URI of the database "
                     "(postgresql://user@host:5432/tampu); give the password with "
                     '"$env:TAMPU_PG_DSN" or "$file:path" rather than in conf.d. Never '
                     "logged.")
    pool_size: int = Field(default=10, ge=2, le=200, description="Connections per tampu "
                           "process (reception workers each have their own pool).")
    lease_seconds: float = Field(default=30.0, ge=1.0, description="How long a claim on a "
                                 "queue item lasts without renewal: a node that dies holds "
                                 "its items this long before another node delivers them. "
                                 "Renewed every third of it while delivering.")
    poll_interval: float = Field(default=2.0, gt=0, description="Seconds between looks for "
                                 "due items when no notification came (LISTEN/NOTIFY wakes "
                                 "the nodes at once otherwise).")
    claim_batch: int = Field(default=50, ge=1, le=1000, description="Items claimed per "
                             "query.")
    max_in_flight: int = Field(default=200, ge=1, description="Items this node delivers at "
                               "once (claims stop beyond).")
    batch_puts: bool = Field(default=True, description="Write messages that arrive while "
                             "others are being committed in one INSERT (one commit for all; "
                             "each client still gets its 250 only after the commit).")
    put_flights: int = Field(default=4, ge=1, le=64, description="INSERTs in flight at once "
                             "with batch_puts; later messages wait and go together in the "
                             "next one.")
    auto_migrate: bool = Field(default=False, description="Apply pending schema migrations "
                               "at start (else run `tampu db migrate`; a node refuses to "
                               "start on an older schema).")
    connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to connect.")
    command_timeout: float = Field(default=30.0, gt=0, description="Seconds one query may "
                                   "take.")

    secret_fields: ClassVar[tuple[str, ...]] = ("dsn",)


def settings_of(config: Config, *, force: bool = False) -> QueuePostgresSettings:
    """``[plugins.queue_postgres]`` validated (``force``: even if not enabled, for ``tampu
    db``). Raises ConfigError."""
    from tampu.registry import validate_plugin_settings

    table = config.plugins.get(NAME)
    if table is None or not (table.enabled or force):
        raise ConfigError([f"{config.origin_of(('server', 'queue_store')) or 'conf.d'}: "
                           f"store {BACKEND!r} needs [plugins.{NAME}] with enabled = true "
                           "and its dsn"])
    settings = validate_plugin_settings(config, NAME, QueuePostgresPlugin, force_enabled=force)
    assert isinstance(settings, QueuePostgresSettings)
    if not settings.dsn:
        where = table.files[0] if table.files else "conf.d"
        raise ConfigError([f"{where}: key plugins.{NAME}.dsn: the database to use is not set"])
    return settings


def open_backend(config: Config, *, force: bool = False) -> StoreBackend:
    """The ``postgres`` store backend of ``config`` (not connected yet)."""
    try:
        from tampu.plugins.queue_postgres.db import Database
    except ImportError as exc:  # asyncpg is an optional dependency
        raise ConfigError([f"store {BACKEND!r} needs asyncpg: pip install 'tampu[postgres]' "
                           f"({exc})"]) from None
    return Database(settings_of(config, force=force), config.node,
                    config.server.max_queue_items)


@hookimpl
def tampu_register_stores(register: RegisterBackend) -> None:
    register(BACKEND, open_backend)


@hookimpl
def tampu_register_cli(subparsers: argparse._SubParsersAction[Any]) -> None:
    """``tampu db migrate|status|import-queue``."""
    from tampu.plugins.queue_postgres.cli import register

    register(subparsers)


class QueuePostgresPlugin:
    """Enabled with the backend: says where the queue and the state are at start."""

    Settings = QueuePostgresSettings

    def __init__(self, ctx: PluginContext[QueuePostgresSettings]) -> None:
        self.ctx = ctx

    @hookimpl
    async def tampu_startup(self, context: ServerContext) -> None:
        from tampu.plugins.queue_postgres.db import Database
        from tampu.stores import state_store_name

        for store in (context.store, context.state):
            db = getattr(store, "db", None)
            if isinstance(db, Database) and not db.serving:
                await db.become_node()  # this process is a node: it shows in tampu_nodes
        server = context.config.server
        used = [what for what, name in (("queue", server.queue_store),
                                        ("state", state_store_name(context.config)))
                if name == BACKEND]
        if not used:
            self.ctx.log.warning("queue_postgres is enabled but neither [server] queue_store "
                                 "nor state_store is %r: the database is not used", BACKEND)
