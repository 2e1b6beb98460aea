"""PostgreSQL for tests: a fresh database per test on the server ``TASKWARDEN_TEST_PG`` names.

``TASKWARDEN_TEST_PG`` is a URL to any database on a server where its role
may CREATE DATABASE (``.ci/run`` sets it). Without it the PostgreSQL cases
are skipped, except under ``CI=true``, where a missing PostgreSQL fails them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

ENV = "TASKWARDEN_TEST_PG"


def admin_url() -> str:
    url = os.environ.get(ENV)
    if not url:
        message = f"${ENV} names no PostgreSQL server (see the README's test section)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; under CI=true PostgreSQL is required")
        pytest.skip(message)
    return url


def _with_dbname(url: str, name: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    parts = conninfo_to_dict(url)
    parts["dbname"] = name
    # Back to URL form: taskwarden tells a server database by its scheme.
    host = parts.pop("host", "")
    port = parts.pop("port", "")
    user = parts.pop("user", "")
    password = parts.pop("password", "")
    parts.pop("dbname")
    auth = f"{user}{':' + password if password else ''}@" if user else ""
    query = make_conninfo(**parts).replace(" ", "&") if parts else ""
    hostport = f"{host}{':' + str(port) if port else ''}" if host and not host.startswith("/") else ""
    extra = f"host={host}" if host.startswith("/") else ""
    params = "&".join(p for p in (query, extra) if p)
    return f"postgresql://{auth}{hostport}/{name}" + (f"?{params}" if params else "")


def fresh_database() -> Iterator[str]:
    """Create an empty database, yield its URL, drop it afterwards."""
    import psycopg

    admin = admin_url()
    name = f"tw_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
