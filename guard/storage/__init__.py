"""The storage floor shared by the guard and the task server: one interface, two backends.

``open_database("…/taskwarden.db")`` opens the embedded SQLite file;
``open_database("postgresql://…")`` a PostgreSQL database several daemons
share. See ``guard.storage.database`` for the contract both keep.
"""

from guard.storage.changes import ChangeFeed
from guard.storage.clock import Clock, FakeClock, SystemClock, iso
from guard.storage.database import (
    Database, Dialect, Migrations, Step, StorageError, Tx, integrity_errors, is_integrity_error, is_server_url,
    is_unique_violation, open_database,
)  # fmt: skip

__all__ = [
    "ChangeFeed", "Clock", "Database", "Dialect", "FakeClock", "Migrations", "Step", "StorageError",
    "SystemClock", "Tx", "integrity_errors", "is_integrity_error", "is_server_url", "is_unique_violation", "iso",
    "open_database",
]  # fmt: skip
