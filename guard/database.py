"""One SQLite file, opened through aiosqlite, shared by the guard and its host.

Every transaction runs as a single function on aiosqlite's worker thread, so
concurrent coroutines never interleave statements inside each other's
transactions, and a whole reservation costs one thread hop instead of four.
Write transactions start with ``BEGIN IMMEDIATE`` so they serialise across
processes that share the file (the limiter's exactness depends on it).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import aiosqlite

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A migration step: SQL to run, or a function given the raw connection.
Step = str | Callable[[sqlite3.Connection], None]

# Another process holding the write lock makes BEGIN IMMEDIATE wait this long
# before giving up; long enough for any of our transactions, which are short.
BUSY_TIMEOUT_MS = 10_000


class Database:
    """An open SQLite database with WAL, foreign keys and serialised writes."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    async def open(cls, path: str | Path) -> Database:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False)
        db = cls(conn, path)

        def setup(c: sqlite3.Connection) -> None:
            c.row_factory = sqlite3.Row
            c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            c.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across process crashes in WAL mode; only a power
            # loss can drop the last commits.
            c.execute("PRAGMA synchronous = NORMAL")
            c.execute("PRAGMA foreign_keys = ON")
            # Deleted data (e.g. anything redaction missed upstream) is zeroed,
            # not left in free pages.
            c.execute("PRAGMA secure_delete = ON")

        await db._run(setup)
        return db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # aiosqlite runs queued callables on its single worker thread, in order;
        # handing it the whole transaction keeps it atomic with respect to
        # other coroutines using this connection.
        raw = self._conn._conn  # noqa: SLF001 - the sqlite3 connection aiosqlite owns
        return await self._conn._execute(fn, raw)  # noqa: SLF001

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a read transaction (a consistent snapshot)."""

        def tx(c: sqlite3.Connection) -> T:
            c.execute("BEGIN")
            try:
                return fn(c)
            finally:
                c.execute("COMMIT")

        return await self._run(tx)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in an immediate write transaction; roll back if it raises."""

        def tx(c: sqlite3.Connection) -> T:
            c.execute("BEGIN IMMEDIATE")
            try:
                result = fn(c)
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
            return result

        return await self._run(tx)

    async def migrate_user_version(self, steps: Sequence[Step]) -> int:
        """Bring the schema owned by ``PRAGMA user_version`` up to ``len(steps)``."""

        def read(c: sqlite3.Connection) -> int:
            return c.execute("PRAGMA user_version").fetchone()[0]

        def write(c: sqlite3.Connection, version: int) -> None:
            c.execute(f"PRAGMA user_version = {int(version)}")

        return await self._migrate("the schema", steps, read, write)

    async def migrate_component(self, component: str, steps: Sequence[Step]) -> int:
        """Versioned schema for a component that shares the file with a host app.

        The host owns ``PRAGMA user_version``; a component (the guard) keeps
        its own version in ``schema_versions`` so the two migrate independently.
        """

        def read(c: sqlite3.Connection) -> int:
            c.execute(
                "CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            row = c.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
            return row[0] if row else 0

        def write(c: sqlite3.Connection, version: int) -> None:
            c.execute(
                "INSERT INTO schema_versions (component, version) VALUES (?, ?)"
                " ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (component, version),
            )

        return await self._migrate(f"the {component} schema", steps, read, write)

    async def _migrate(
        self,
        what: str,
        steps: Sequence[Step],
        read: Callable[[sqlite3.Connection], int],
        write: Callable[[sqlite3.Connection, int], None],
    ) -> int:
        def run(c: sqlite3.Connection) -> int:
            current = read(c)
            if current > len(steps):
                raise RuntimeError(
                    f"{self.path}: {what} is at version {current}, newer than this "
                    f"taskwarden understands ({len(steps)}); upgrade taskwarden"
                )
            for version in range(current, len(steps)):
                _apply(c, steps[version])
                write(c, version + 1)
            return len(steps)

        return await self.write(run)

    async def close(self) -> None:
        await self._conn.close()


def _apply(c: sqlite3.Connection, step: Step) -> None:
    if callable(step):
        step(c)
        return
    # executescript() would COMMIT our open transaction; run statements one by one.
    for statement in _split_sql(step):
        c.execute(statement)


def _split_sql(script: str) -> list[str]:
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
