"""Database errors of both backends, for the few places that name them.

The storage floor hands out ``sqlite3`` errors on SQLite and ``psycopg``
errors on PostgreSQL; code that reports "the database failed" asks here
instead of importing one driver. (Constraint violations: see
``guard.storage.integrity_errors`` and ``is_unique_violation``.)
"""

from __future__ import annotations

import sqlite3


def _psycopg_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return ()
    return (psycopg.Error,)


#: Any error raised by either database driver.
DB_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, *_psycopg_errors())
