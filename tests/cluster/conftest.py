"""A real PostgreSQL for the queue_postgres and cluster tests: one server per test session
(initdb + pg_ctl, tests/pgserver.py), a fresh database per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from tests.pgserver import PostgresServer, find_bindir

_numbers = itertools.count()


def _missing(what: str) -> None:
    msg = f"{what} (apt-get install postgresql; pip install 'tampu[postgres]')"
    if os.environ.get("TAMPU_REQUIRE_TOOLS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (skipped when not installed, failed under
    TAMPU_REQUIRE_TOOLS=1)."""
    if find_bindir() is None:
        _missing("PostgreSQL is not installed")
    try:
        import asyncpg  # noqa: F401 - the driver queue_postgres needs
    except ImportError:
        _missing("asyncpg is not installed")
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> str:
    """The DSN of a new, empty database for this test."""
    return postgres.create_database(f"test_{os.getpid()}_{next(_numbers)}")
