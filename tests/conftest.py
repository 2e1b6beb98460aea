"""Shared test setup: anyio runs on asyncio; `pg_url` and `db_target` give PostgreSQL databases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import stop_daemons


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test(tmp_path: Path) -> Iterator[None]:
    """Each workspace's database has its own daemon: stop it when the test ends."""
    yield
    stop_daemons(tmp_path)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (see tests/pg_support.py)."""
    from tests.pg_support import fresh_database

    yield from fresh_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test on both backends: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "taskwarden.db")
        return
    from tests.pg_support import fresh_database

    yield from fresh_database()
