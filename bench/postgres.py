"""A fresh PostgreSQL database for a measurement, on the server ``TASKWARDEN_TEST_PG`` names.

Sections that compare the backends measure PostgreSQL only when that variable
is set (``.ci/run`` sets it); otherwise they say so in their details.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "TASKWARDEN_TEST_PG"


def available() -> bool:
    return bool(os.environ.get(ENV))


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create an empty database, yield its ``postgresql://`` URL, drop it afterwards."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    admin = os.environ[ENV]
    name = f"tw_bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = conninfo_to_dict(admin)
    host = parts.get("host", "")
    auth = parts.get("user", "") + (f":{parts['password']}" if parts.get("password") else "")
    netloc = (f"{auth}@" if auth else "") + (host if host and not host.startswith("/") else "")
    netloc += f":{parts['port']}" if parts.get("port") and host and not host.startswith("/") else ""
    query = f"?host={host}" if host.startswith("/") else ""
    try:
        yield f"postgresql://{netloc}/{name}{query}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
