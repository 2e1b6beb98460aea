"""Shared test setup: anyio runs on asyncio (aiosqlite needs it)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
