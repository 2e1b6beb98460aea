"""Database errors of both backends, for the few places that name them.

The guard's storage floor hands out ``sqlite3`` errors on SQLite and
``psycopg`` errors on PostgreSQL; code that reports "the database failed" or
tells a duplicate key from other failures asks here instead of importing one
driver.
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


def is_unique_violation(exc: BaseException) -> bool:
    """True when ``exc`` is a UNIQUE/PRIMARY KEY conflict on either backend."""
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc)
    try:
        from psycopg import errors
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, errors.UniqueViolation)
