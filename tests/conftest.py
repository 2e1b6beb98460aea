"""Shared test setup: anyio runs on asyncio (aiosqlite needs it)."""

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
