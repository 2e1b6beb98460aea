"""The embedded backend: one SQLite file (WAL) shared by every process on the host.

The connection is the standard library's. Every transaction runs whole, as
one function, on a worker thread, one at a time per connection (an anyio
capacity limiter of 1), so concurrent coroutines never interleave statements
inside each other's transactions and a whole reservation costs one thread
hop. Write transactions start with ``BEGIN IMMEDIATE`` so they serialise
across processes that share the file.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.to_thread

from guard.storage.database import Database, Migrations, Step, StorageError, Tx

if TYPE_CHECKING:
    from guard.storage.changes import ChangeFeed

T = TypeVar("T")

# Another process holding the write lock makes BEGIN IMMEDIATE wait this long
# before giving up; long enough for any of our transactions, which are short.
BUSY_TIMEOUT_MS = 10_000


class _Connection(sqlite3.Connection):
    # Transaction functions ask ``tx.dialect`` where the SQL must differ.
    dialect = "sqlite"


class SQLiteDatabase(Database):
    """An open SQLite database with WAL, foreign keys and serialised writes."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._turn = anyio.CapacityLimiter(1)

    @property
    def display(self) -> str:
        return str(self.path)

    @classmethod
    async def open(cls, path: Path) -> SQLiteDatabase:
        path = Path(path).expanduser()

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            # check_same_thread=False: one transaction at a time, from whichever worker thread.
            c = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, factory=_Connection,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )  # fmt: skip
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
            return c

        try:
            conn = await anyio.to_thread.run_sync(connect)
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"{path}: {exc}") from exc
        return cls(conn, path)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # Not abandoned on cancellation: a transaction, once begun, finishes
        # (commits or rolls back) before its caller sees the cancellation.
        return await anyio.to_thread.run_sync(fn, self._conn, limiter=self._turn)

    async def read(self, fn: Callable[[Tx], T]) -> T:
        def tx(c: sqlite3.Connection) -> T:
            c.execute("BEGIN")
            try:
                return fn(c)  # type: ignore[arg-type]
            finally:
                c.execute("COMMIT")

        return await self._run(tx)

    async def write(self, fn: Callable[[Tx], T]) -> T:
        def tx(c: sqlite3.Connection) -> T:
            c.execute("BEGIN IMMEDIATE")
            try:
                result = fn(c)  # type: ignore[arg-type]
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
            return result

        return await self._run(tx)

    async def migrate_user_version(self, steps: Migrations) -> int:
        wanted = steps.sqlite

        def set_version(tx: Tx, version: int) -> None:
            tx.execute(f"PRAGMA user_version = {int(version)}")

        def current(tx: Tx) -> int:
            return tx.execute("PRAGMA user_version").fetchone()[0]

        return await self.write(lambda tx: self._upgrade(tx, "the schema", wanted, current(tx), set_version))

    def _apply(self, tx: Tx, step: Step) -> None:
        if callable(step):
            step(tx)
            return
        # executescript() would COMMIT our open transaction; run statements one by one.
        for statement in _split_sql(step):
            tx.execute(statement)

    def change_feed(self) -> ChangeFeed:
        from guard.storage.changes import SocketChangeFeed

        return SocketChangeFeed(self.path)

    async def announce(self) -> None:
        from guard.storage.changes import notify_others

        notify_others(self.path)

    async def secret_key(self, name: str, size: int = 32) -> bytes:
        # A file beside the database (0600), as earlier releases kept it: the
        # key must not live in the file it protects digests of.
        return await anyio.to_thread.run_sync(load_key_file, key_path(self.path, name), size)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._conn.close, limiter=self._turn)


class KeyFileError(StorageError):
    """A key file exists but cannot be used (wrong size, unreadable)."""


def key_path(db_path: Path, name: str = "digest") -> Path:
    """Where the SQLite file ``db_path`` keeps its key ``name``: beside it."""
    return db_path.with_name(db_path.name + ("" if name == "digest" else f".{name}") + ".key")


def load_key_file(path: Path, size: int) -> bytes:
    """The key in ``path``, created (0600) if it does not exist yet.

    Written under a temporary name, then hard-linked into place, so
    concurrent processes opening one database agree on one key.
    """
    try:
        return _read_key(path, size)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(size))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process linked its key first
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path, size)


def _read_key(path: Path, size: int) -> bytes:
    key = path.read_bytes()
    if len(key) != size:
        raise KeyFileError(f"{path}: a key must be {size} bytes, this file has {len(key)}")
    return key


def _split_sql(script: str) -> Sequence[str]:
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
