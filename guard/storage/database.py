"""The storage floor: one interface over SQLite and PostgreSQL.

A transaction is a plain function of a ``Tx`` (``tx.execute(sql, params)``,
``?`` placeholders, rows readable by name and by index), so the task store,
the limiter, approvals and audit write each transaction once and it runs on
either backend. ``read`` gives a consistent snapshot; ``write`` is serialised
against every other writer of the same database, in this process and in any
other (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: one transaction-scoped
advisory lock), which is what keeps limits exact and approvals single-use
across processes and hosts.

Schemas are versioned per component (``schema_versions``) with one list of
steps per dialect; a released step is never edited.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    from guard.storage.changes import ChangeFeed

T = TypeVar("T")

Dialect = Literal["sqlite", "postgresql"]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    """What a transaction function is given: ``sqlite3.Connection``'s subset both backends have.

    Rows support ``row["name"]``, ``row[0]`` and ``dict(row)``. There is no
    ``lastrowid``: ask for ids with ``RETURNING``.
    """

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Any: ...


#: A migration step: SQL (one or more statements), or a function given the transaction.
Step = str | Callable[[Tx], None]


@dataclass(frozen=True)
class Migrations:
    """A component's schema steps, one append-only list per backend."""

    sqlite: Sequence[Step]
    postgresql: Sequence[Step] = field(default_factory=list)

    def for_dialect(self, dialect: Dialect) -> Sequence[Step]:
        return self.sqlite if dialect == "sqlite" else self.postgresql


class StorageError(RuntimeError):
    """The database cannot be opened or used (named in one line for the user)."""


class Database(abc.ABC):
    """An open database shared by the guard, the task store and other processes."""

    dialect: Dialect
    #: The SQLite file, or None for a server database.
    path: Path | None

    @property
    @abc.abstractmethod
    def display(self) -> str:
        """Where the data lives, for logs and messages (no password)."""

    @abc.abstractmethod
    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a read transaction (a consistent snapshot)."""

    @abc.abstractmethod
    async def write(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a write transaction serialised against every other writer; roll back if it raises."""

    @abc.abstractmethod
    def change_feed(self) -> ChangeFeed:
        """A new, not yet started, feed of "something changed" for this database."""

    @abc.abstractmethod
    async def announce(self) -> None:
        """Wake every process listening on this database (for processes without a feed)."""

    @abc.abstractmethod
    async def secret_key(self, name: str, size: int = 32) -> bytes:
        """A random key shared by every process using this database, made on first use."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def migrate_component(self, component: str, steps: Migrations) -> int:
        """Bring ``component``'s tables up to date; returns its schema version."""
        wanted = steps.for_dialect(self.dialect)
        if not wanted:
            raise StorageError(f"the {component} schema has no {self.dialect} version")

        def set_version(tx: Tx, version: int) -> None:
            tx.execute(
                "INSERT INTO schema_versions (component, version) VALUES (?, ?)"
                " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (component, version),
            )

        def run(tx: Tx) -> int:
            current = self._schema_version(tx, component)
            return self._upgrade(tx, f"the {component} schema", wanted, current, set_version)

        return await self.write(run)

    def _upgrade(
        self, tx: Tx, what: str, wanted: Sequence[Step], current: int, set_version: Callable[[Tx, int], None]
    ) -> int:
        """Apply the steps after ``current`` in this transaction; refuse a newer schema than we know."""
        if current > len(wanted):
            raise StorageError(
                f"{self.display}: {what} is at version {current}, newer than this "
                f"taskwarden understands ({len(wanted)}); upgrade taskwarden"
            )
        for version in range(current, len(wanted)):
            self._apply(tx, wanted[version])
            set_version(tx, version + 1)
        return len(wanted)

    async def migrate_user_version(self, steps: Migrations) -> int:
        """The host application's own schema (the task store).

        SQLite keeps its version in ``PRAGMA user_version`` (files made by
        earlier releases); a server database keeps it as component ``taskwarden``.
        """
        return await self.migrate_component("taskwarden", steps)

    def _schema_version(self, tx: Tx, component: str) -> int:
        tx.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        row = tx.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
        return int(row[0]) if row else 0

    @abc.abstractmethod
    def _apply(self, tx: Tx, step: Step) -> None: ...


def integrity_errors() -> tuple[type[Exception], ...]:
    """The exception classes a constraint violation raises on either backend, for ``except``.

    psycopg is imported only if it is installed (SQLite alone needs nothing).
    """
    return _integrity_errors()


@functools.cache
def _integrity_errors() -> tuple[type[Exception], ...]:
    import sqlite3

    found: list[type[Exception]] = [sqlite3.IntegrityError]
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        pass
    else:
        found.append(psycopg.IntegrityError)
    return tuple(found)


def is_integrity_error(exc: BaseException) -> bool:
    """True for a constraint violation (unique, check, foreign key, a trigger's refusal) on either backend."""
    return isinstance(exc, integrity_errors())


def is_unique_violation(exc: BaseException) -> bool:
    """True when ``exc`` is a UNIQUE / PRIMARY KEY violation on either backend."""
    import sqlite3

    if isinstance(exc, sqlite3.IntegrityError):
        name = getattr(exc, "sqlite_errorname", "")
        if name:
            return name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")
        return "UNIQUE constraint failed" in str(exc)
    try:
        from psycopg.errors import UniqueViolation
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, UniqueViolation)


def is_server_url(target: str | Path | None) -> bool:
    """True when ``target`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


async def open_database(target: str | Path) -> Database:
    """Open the SQLite file or the ``postgresql://`` database ``target`` names."""
    if is_server_url(target):
        from guard.storage.postgres import PostgresDatabase

        return await PostgresDatabase.open(str(target))
    from guard.storage.sqlite import SQLiteDatabase

    return await SQLiteDatabase.open(Path(target))
