"""The daemon registry: which daemons use this database, and until when each is known to be alive.

Every daemon writes one row when it starts (host, pid, start time, version,
the address of its inbox), renews its lease (``lease_until``) every third of
the lease, and deletes the row when it exits cleanly. On a database shared by
several hosts a process id says nothing about another host, so a daemon is
alive for the others while its lease runs: a host that dies, loses the
network or stalls stops renewing, and once its lease lapses the others take
over what it left (see ``worker_server.hosts``).

Times are the database server's clock on PostgreSQL (one clock for every
host, so skew between hosts does not shorten or stretch a lease), or the
injected ``clock`` (tests, SQLite).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from guard.storage.clock import Clock, iso
from guard.storage.database import Database, Migrations, Tx

SCHEMA = Migrations(
    sqlite=[
        """
        CREATE TABLE daemons (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started REAL NOT NULL,
            version TEXT NOT NULL,
            url TEXT,
            registered_at REAL NOT NULL,
            renewed_at REAL NOT NULL,
            lease_until REAL NOT NULL
        );
        CREATE INDEX daemons_owner ON daemons(pid, started);
        """,
    ],
    postgresql=[
        """
        CREATE TABLE daemons (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid BIGINT NOT NULL,
            started DOUBLE PRECISION NOT NULL,
            version TEXT NOT NULL,
            url TEXT,
            registered_at DOUBLE PRECISION NOT NULL,
            renewed_at DOUBLE PRECISION NOT NULL,
            lease_until DOUBLE PRECISION NOT NULL
        );
        CREATE INDEX daemons_owner ON daemons(pid, started);
        """,
    ],
)

#: Rows whose lease lapsed this long ago are forgotten (they still tell which
#: host a dead daemon ran on, and so who may kill what it left, until then).
FORGET_AFTER_S = 7 * 86_400.0

_COLUMNS = "id, host, pid, started, version, url, registered_at, renewed_at, lease_until"


@dataclass(frozen=True)
class DaemonRecord:
    id: str
    host: str
    pid: int
    started: float
    version: str
    url: str | None
    registered_at: float
    renewed_at: float
    lease_until: float

    @property
    def owner(self) -> tuple[int, float]:
        """The (pid, start time) pair the runner writes on the turns it owns."""
        return (self.pid, self.started)

    def live(self, now: float) -> bool:
        return self.lease_until >= now

    def describe(self, now: float, *, this: str | None = None) -> dict[str, Any]:
        """For ``daemon status``: the row, its times as ISO 8601 and ages in seconds."""
        out = asdict(self)
        out.update(
            live=self.live(now),
            this=self.id == this,
            renewed=iso(self.renewed_at),
            renewed_s_ago=round(now - self.renewed_at, 2),
            lease_left_s=round(self.lease_until - now, 2),
        )
        return out

    @classmethod
    def from_row(cls, row: Any) -> DaemonRecord:
        return cls(
            id=row["id"], host=row["host"], pid=int(row["pid"]), started=float(row["started"]),
            version=row["version"], url=row["url"], registered_at=float(row["registered_at"]),
            renewed_at=float(row["renewed_at"]), lease_until=float(row["lease_until"]),
        )  # fmt: skip


class DaemonRegistry:
    def __init__(self, db: Database, clock: Clock | None = None) -> None:
        self.db = db
        self.clock = clock
        # PostgreSQL: renewals go through a connection of their own (see renew).
        self._conn: Any = None
        self._conn_lock = anyio.Lock()

    async def migrate(self) -> None:
        await self.db.migrate_component("daemons", SCHEMA)

    def _now(self, tx: Tx) -> float:
        if self.clock is not None:
            return self.clock.now()
        if tx.dialect == "postgresql":
            return float(tx.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8").fetchone()[0])
        return time.time()

    async def now(self) -> float:
        return await self.db.read(self._now)

    async def register(
        self, *, host: str, pid: int, started: float, version: str, url: str | None, lease_s: float,
        replaces: str | None = None,
    ) -> DaemonRecord:  # fmt: skip
        """A new row with a fresh lease (``replaces``: this daemon's previous row, now lapsed)."""
        daemon_id = f"d_{secrets.token_hex(8)}"

        def write(tx: Tx) -> DaemonRecord:
            now = self._now(tx)
            if replaces is not None:
                tx.execute("DELETE FROM daemons WHERE id = ?", (replaces,))
            tx.execute("DELETE FROM daemons WHERE lease_until < ?", (now - FORGET_AFTER_S,))
            tx.execute(
                f"INSERT INTO daemons ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (daemon_id, host, pid, started, version, url, now, now, now + lease_s),
            )
            return DaemonRecord(daemon_id, host, pid, started, version, url, now, now, now + lease_s)

        return await self.db.write(write)

    async def renew(self, daemon_id: str, lease_s: float) -> bool:
        """Extend the lease; False when it had already lapsed (or the row is gone): the others
        may have taken over this daemon's turns, so it must not carry on as if nothing happened.

        On PostgreSQL a renewal must not queue behind the daemon's own work: it
        runs on a connection of its own, outside the pool, and without the
        write lock every other transaction takes (it changes one row of this
        daemon's, and its condition is checked against the latest committed
        lease, so a lease another daemon saw lapsed is never renewed).
        """
        if self.db.dialect == "postgresql" and self.clock is None:
            return await self._renew_direct(daemon_id, lease_s)

        def write(tx: Tx) -> bool:
            now = self._now(tx)
            cur = tx.execute(
                "UPDATE daemons SET renewed_at = ?, lease_until = ? WHERE id = ? AND lease_until >= ?",
                (now, now + lease_s, daemon_id, now),
            )
            return cur.rowcount > 0

        return await self.db.write(write)

    async def _renew_direct(self, daemon_id: str, lease_s: float) -> bool:
        async with self._conn_lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await self.db.connect_listener()  # type: ignore[attr-defined]
                cur = await self._conn.execute(
                    "UPDATE daemons SET renewed_at = t.now_s, lease_until = t.now_s + %s"
                    " FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now_s) AS t"
                    " WHERE id = %s AND lease_until >= t.now_s",
                    (lease_s, daemon_id),
                )
                return cur.rowcount > 0
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Close the renewal connection, if one is open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def unregister(self, daemon_id: str) -> None:
        await self.db.write(lambda tx: tx.execute("DELETE FROM daemons WHERE id = ?", (daemon_id,)))

    async def find(self, owner: tuple[int, float]) -> tuple[float, DaemonRecord | None]:
        """The database's time now, and the newest row of the daemon that owns turns as ``owner``."""

        def read(tx: Tx) -> tuple[float, DaemonRecord | None]:
            row = tx.execute(
                # A start time read back from a turn's row may have lost a few digits.
                f"SELECT {_COLUMNS} FROM daemons WHERE pid = ? AND started BETWEEN ? AND ?"
                " ORDER BY renewed_at DESC LIMIT 1",
                (owner[0], owner[1] - 0.01, owner[1] + 0.01),
            ).fetchone()
            return self._now(tx), DaemonRecord.from_row(row) if row else None

        return await self.db.read(read)

    async def all(self) -> tuple[float, list[DaemonRecord]]:
        """The database's time now, and every registered daemon (live or lapsed), by host and pid."""

        def read(tx: Tx) -> tuple[float, list[DaemonRecord]]:
            rows = tx.execute(f"SELECT {_COLUMNS} FROM daemons ORDER BY host, pid, renewed_at").fetchall()
            return self._now(tx), [DaemonRecord.from_row(r) for r in rows]

        return await self.db.read(read)
