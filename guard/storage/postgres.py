"""The shared backend: one PostgreSQL database used by daemons on any number of hosts.

psycopg 3 with a psycopg-pool connection pool. Transactions are the same
plain functions the SQLite backend runs (``?`` placeholders, rows by name or
index), run whole on a worker thread with a pooled connection: the task
store, limiter, approvals and audit keep one body of SQL for both backends.

Every write transaction first takes one transaction-scoped advisory lock, so
writers are serialised across every daemon exactly as ``BEGIN IMMEDIATE``
serialises them on SQLite: a limit's check-then-take, an approval's
use-once and a claim's count-then-start are each atomic across hosts.
Reads run at REPEATABLE READ, a snapshot, and never wait for writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from guard.storage.changes import ChangeFeed
from guard.storage.database import Database, Step, StorageError, Tx

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The advisory lock every write transaction holds (any fixed 64-bit number;
#: this one spells "taskwrdn").
WRITE_LOCK = 0x7461736B7772646E
#: The LISTEN/NOTIFY channel for "something changed".
CHANNEL = "taskwarden_changes"
#: NOTIFY can be lost while a listener reconnects: waiters re-check this often regardless.
SAFETY_POLL_S = 2.0
POOL_MAX = 8


class Row(tuple):
    """A result row readable by index, by column name, and as ``dict(row)``."""

    __slots__ = ()
    _names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


@functools.lru_cache(maxsize=64)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_names": {n: i for i, n in enumerate(names)}})


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Any]:
    if cursor.description is None:
        return tuple
    cls = _row_class(tuple(c.name for c in cursor.description))
    return lambda values: cls(values)


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s``, literal ``%`` doubled; quoted text and comments kept."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            end = i + 1
            while end < n:
                if sql[end] == ch:
                    if end + 1 < n and sql[end + 1] == ch:  # '' inside a literal
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1].replace("%", "%%"))
            i = end + 1
        elif ch == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif ch == "?":
            out.append("%s")
            i += 1
        elif ch == "%":
            out.append("%%")
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class _Tx:
    """A pooled connection inside one transaction, spoken to like ``sqlite3.Connection``."""

    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if params:
            return self._conn.execute(translate(sql), tuple(params))  # type: ignore[arg-type]
        return self._conn.execute(sql)  # type: ignore[arg-type]

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Any:
        cur = self._conn.cursor()
        cur.executemany(translate(sql), [tuple(p) for p in seq])  # type: ignore[arg-type]
        return cur


def redacted(url: str) -> str:
    """The URL without its password, for logs and messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - a malformed URL is shown as the scheme alone
        return "postgresql://…"
    host = parts.get("host", "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    user = f"{parts['user']}@" if parts.get("user") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


class PostgresDatabase(Database):
    dialect = "postgresql"
    path = None

    def __init__(self, url: str, pool: psycopg_pool.ConnectionPool) -> None:
        self.url = url
        self._pool = pool
        self._slots = anyio.CapacityLimiter(POOL_MAX)

    @property
    def display(self) -> str:
        return redacted(self.url)

    @classmethod
    async def open(cls, url: str, *, connect_timeout_s: float = 10.0) -> PostgresDatabase:
        try:
            import psycopg
            import psycopg_pool
        except ImportError as exc:  # pragma: no cover - both are dependencies
            raise StorageError(f"PostgreSQL needs psycopg and psycopg-pool: {exc}") from exc

        def connect() -> psycopg_pool.ConnectionPool:
            pool = psycopg_pool.ConnectionPool(
                url, min_size=1, max_size=POOL_MAX, open=False, name="taskwarden",
                kwargs={
                    "autocommit": True, "row_factory": _row_factory, "connect_timeout": max(1, int(connect_timeout_s)),
                },
            )  # fmt: skip
            try:
                pool.open(wait=True, timeout=connect_timeout_s)
            except psycopg_pool.PoolTimeout as exc:
                pool.close()
                # The pool swallows the reason; one direct attempt names it.
                try:
                    psycopg.connect(url, connect_timeout=max(1, int(connect_timeout_s))).close()
                except psycopg.Error as reason:
                    raise StorageError(f"cannot reach {redacted(url)}: {str(reason).strip()}") from exc
                raise StorageError(f"cannot reach {redacted(url)} within {connect_timeout_s:g} s") from exc
            return pool

        pool = await anyio.to_thread.run_sync(connect)
        return cls(url, pool)

    async def _run(self, begin: str, fn: Callable[[Tx], T], *, lock: bool) -> T:
        def tx() -> T:
            with self._pool.connection() as conn:
                # BEGIN and the write lock in one round trip (one simple query).
                conn.execute(f"{begin}; SELECT pg_advisory_xact_lock({WRITE_LOCK})" if lock else begin)  # type: ignore[arg-type]
                try:
                    result = fn(_Tx(conn))  # type: ignore[arg-type]
                except BaseException:
                    with contextlib.suppress(Exception):
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result

        # Not abandoned on cancellation: a begun transaction ends before its caller sees the cancellation.
        return await anyio.to_thread.run_sync(tx, limiter=self._slots)

    async def read(self, fn: Callable[[Tx], T]) -> T:
        return await self._run("BEGIN ISOLATION LEVEL REPEATABLE READ", fn, lock=False)

    async def write(self, fn: Callable[[Tx], T]) -> T:
        return await self._run("BEGIN", fn, lock=True)

    def _apply(self, tx: Tx, step: Step) -> None:
        if callable(step):
            step(tx)
            return
        tx.execute(step)  # several statements at once: no parameters, so the simple protocol

    def change_feed(self) -> ChangeFeed:
        return ListenChangeFeed(self)

    async def announce(self) -> None:
        await self.write(lambda tx: tx.execute("SELECT pg_notify(?, '')", (CHANNEL,)))

    async def secret_key(self, name: str, size: int = 32) -> bytes:
        # Shared by every daemon on every host, so a link signed by one is
        # accepted by all and an approval's digest matches wherever it is used.
        candidate = secrets.token_bytes(size)

        def run(tx: Tx) -> bytes:
            tx.execute("CREATE TABLE IF NOT EXISTS storage_keys (name TEXT PRIMARY KEY, key BYTEA NOT NULL)")
            tx.execute(
                "INSERT INTO storage_keys (name, key) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, candidate)
            )
            return bytes(tx.execute("SELECT key FROM storage_keys WHERE name = ?", (name,)).fetchone()[0])

        key = await self.write(run)
        if len(key) != size:
            raise StorageError(f"{self.display}: key {name!r} must be {size} bytes, it has {len(key)}")
        return key

    def connect_listener(self) -> Any:
        import psycopg

        return psycopg.AsyncConnection.connect(self.url, autocommit=True)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._pool.close)


class ListenChangeFeed(ChangeFeed):
    """LISTEN/NOTIFY as the hint, a slow poll as the safety net.

    ``notify()`` wakes waiters here at once and queues one NOTIFY (bursts
    coalesce) that every other daemon's listener receives when it commits.
    While the listener reconnects, waiters are woken every ``SAFETY_POLL_S``
    so a lost notification delays them, never strands them.
    """

    def __init__(self, db: PostgresDatabase) -> None:
        super().__init__()
        self._db = db
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: asyncio.Event | None = None  # made in start(), on the running loop
        self._stopping = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._pending = asyncio.Event()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._send())]

    async def _listen(self) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                async with await self._db.connect_listener() as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.1
                    self._fire()  # anything missed while (re)connecting
                    while not self._stopping:
                        got = False
                        async for _ in conn.notifies(timeout=SAFETY_POLL_S, stop_after=1):
                            got = True
                        self._fire()
                        if not got:
                            continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener reconnects; waiters fall back to polling
                logger.warning("change feed lost its PostgreSQL connection (%s); reconnecting", exc)
                self._fire()
                await asyncio.sleep(min(delay, SAFETY_POLL_S))
                delay *= 2

    async def _send(self) -> None:
        assert self._pending is not None
        while not self._stopping:
            await self._pending.wait()
            self._pending.clear()
            try:
                await self._db.announce()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the others' safety poll still finds the change
                logger.warning("could not notify other daemons: %s", exc)
                await asyncio.sleep(0.2)

    def notify(self) -> None:
        self._fire()
        if self._pending is not None:
            self._pending.set()

    def close(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        self._tasks = []
