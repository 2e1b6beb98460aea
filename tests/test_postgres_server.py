"""The task server on PostgreSQL end to end: ``serve --http`` with ``db = "postgresql://…"``.

A real MCP client spawns a task with the fake agent and waits for it over
streamable HTTP; the CLI then lists it from the same database. Needs
``TASKWARDEN_TEST_PG`` (see tests/pg_support.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import StrictClient, Workspace, call, http_server, spawn_and_wait

pytestmark = pytest.mark.anyio


def pg_workspace(tmp_path: Path, url: str) -> Workspace:
    ws = Workspace(tmp_path)
    text = ws.config.read_text()
    sqlite_line = f"db = {json.dumps(str(ws.db))}\n"
    assert sqlite_line in text
    # Per-host state (the daemon's socket, logs, scratch) under the workspace.
    ws.config.write_text(
        text.replace(sqlite_line, f"db = {json.dumps(url)}\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n")
    )
    return ws


async def test_spawn_and_wait_over_http_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    ws = pg_workspace(tmp_path, pg_url)
    async with http_server(ws, "--allow-anonymous", "--no-inbox") as base:
        async with StrictClient(f"{base}/mcp") as client:
            task = await spawn_and_wait(client, "say from postgres", labels=["pg"])
            assert task["status"] == "completed"
            assert task["output"]["final"] == "from postgres"
            nxt = await call(client, "message-task", {"task_id": task["task_id"], "message": "history"})
            done = (await call(client, "wait-task", {"task_ids": nxt["task_id"]}))["tasks"][0]
            assert done["status"] == "completed"
            assert done["output"]["final"] == "turn 1 prompt: say from postgres"
    assert not ws.db.exists()  # nothing went to a SQLite file

    listed = json.loads(ws.cli("tasks", "list", "--json", "--label", "pg").stdout)
    # Newest first; the second turn keeps the session's labels.
    assert [t["task_id"] for t in listed["tasks"]] == [nxt["task_id"], task["task_id"]]
    assert {t["status"] for t in listed["tasks"]} == {"completed"}
    # --db names the server database as well as the config's db does.
    by_flag = ws.cli("tasks", "list", "--db", pg_url)
    assert task["task_id"] in by_flag.stdout and nxt["task_id"] in by_flag.stdout


def test_a_server_database_that_cannot_be_reached_is_one_line_and_exit_1(tmp_path: Path, pg_url: str) -> None:
    from tests.pg_support import _with_dbname, admin_url

    missing = _with_dbname(admin_url(), "tw_no_such_database")
    ws = Workspace(tmp_path)
    proc = ws.cli("tasks", "list", "--db", missing, check=False, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taskwarden: cannot reach postgresql://"), proc.stderr
    assert "tw_no_such_database" in lines[0]
