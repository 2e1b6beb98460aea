"""Roles and quorum end to end: a real server, the real CLI (``--as``) and the inbox over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.inbox_support import add_human, post_form, signed_in_client
from tests.support import FIXTURES, StrictClient, Workspace, call, call_error, http_server
from guard.storage import open_database

pytestmark = pytest.mark.anyio

APPROVALS_FAST = FIXTURES / "policies" / "approvals-fast.yaml"
QUORUM = FIXTURES / "policies" / "approvals-quorum.yaml"


async def test_a_worker_can_neither_see_nor_decide_an_approval(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=APPROVALS_FAST)
    async with http_server(ws, "--allow-anonymous") as base:
        async with StrictClient(f"{base}/mcp") as client, signed_in_client(ws, base, "wes", role="worker") as http:
            task = await call(client, "spawn-task", {"prompt": "label photos", "worker": "human"})
            held = await call_error(client, "cancel-task", {"task_id": task["task_id"]})
            approval_id = held.structured_content["approval"]["id"]

            inbox = (await http.get("/inbox/?tab=approvals")).text
            assert 'data-count="approvals">0<' in inbox and approval_id not in inbox
            assert (await http.get(f"/inbox/approvals/{approval_id}")).status_code == 404
            # Even with a valid form token (from a page they may see), the decision is refused.
            refused = await post_form(http, "/inbox/", f"/inbox/approvals/{approval_id}/approve")
            assert refused.status_code == 404

            cli = ws.cli("approvals", "approve", approval_id, "--as", "wes", check=False)
            assert cli.returncode == 1
            assert f"wes may not decide {approval_id}" in cli.stdout
            denied = ws.cli("approvals", "deny", approval_id, "--reason", "no", "--as", "wes", check=False)
            assert denied.returncode == 1
            listed = json.loads(ws.cli("approvals", "list", "--json").stdout)
            assert listed[0]["status"] == "pending" and listed[0]["decided_by"] is None

            # An approver sees and decides it; the held call then runs.
            add_human(ws, "ann", base, "approver")
            ws.cli("approvals", "approve", approval_id, "--as", "ann")
            done = await call(client, "cancel-task", {"task_id": task["task_id"]})
            assert done["cancelled"] == [task["task_id"]]


async def test_quorum_two_of_three_and_one_denial_denies(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=QUORUM)
    async with http_server(ws, "--allow-anonymous") as base:
        for name in ("ann", "bob", "cy"):
            add_human(ws, name, base, "worker")  # named approvers decide whatever their role
        async with StrictClient(f"{base}/mcp") as client:
            first = await call(client, "spawn-task", {"prompt": "one", "worker": "human"})
            second = await call(client, "spawn-task", {"prompt": "two", "worker": "human"})
            held = await call_error(client, "cancel-task", {"task_id": first["task_id"]})
            approval_id = held.structured_content["approval"]["id"]

            one = ws.cli("approvals", "approve", approval_id, "--as", "ann", "--comment", "ok by me")
            assert "1 of 2" in one.stdout
            still = await call_error(client, "cancel-task", {"task_id": first["task_id"]})
            assert still.structured_content["error"] == "approval_required"
            assert ws.cli("approvals", "approve", approval_id, "--as", "ann", check=False).returncode == 1
            ws.cli("approvals", "approve", approval_id, "--as", "bob")
            done = await call(client, "cancel-task", {"task_id": first["task_id"]})
            assert done["cancelled"] == [first["task_id"]]
            record = next(a for a in json.loads(ws.cli("approvals", "list", "--json").stdout) if a["id"] == approval_id)
            assert record["decided_by"] == "ann, bob" and record["approvals_so_far"] == 2
            assert [(d["by"], d["decision"], d["channel"], d["comment"]) for d in record["decisions"]] == [
                ("ann", "approve", "cli", "ok by me"), ("bob", "approve", "cli", None)]

            held2 = await call_error(client, "cancel-task", {"task_id": second["task_id"]})
            other = held2.structured_content["approval"]["id"]
            ws.cli("approvals", "approve", other, "--as", "ann")
            ws.cli("approvals", "deny", other, "--as", "cy", "--reason", "still needed")
            answer = await call_error(client, "cancel-task", {"task_id": second["task_id"]})
            assert answer.structured_content["error"] == "approval_denied"
            assert "still needed" in answer.structured_content["reason"]


def test_only_admins_or_the_operator_manage_people(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.cli("humans", "add", "ada", "--role", "admin")  # the operator (a name that is nobody's)
    ws.cli("humans", "add", "wes")
    refused = ws.cli("humans", "add", "eve", "--role", "admin", "--as", "wes", check=False)
    assert refused.returncode == 1 and "only an admin" in refused.stderr
    assert ws.cli("humans", "remove", "ada", "--as", "wes", check=False).returncode == 1
    made = ws.cli("humans", "add", "eve", "--role", "approver", "--as", "ada").stdout
    assert "Sign-in link for eve (approver;" in made
    roles = {line.split("\t")[0]: line.split("\t")[3] for line in ws.cli("humans", "list").stdout.splitlines()}
    assert roles == {"ada": "admin", "eve": "approver", "wes": "worker"}
    bad = ws.cli("humans", "add", "x", "--email", "not-an-address", check=False)
    assert bad.returncode == 2 and "--email" in bad.stderr


async def test_people_added_before_roles_become_approvers(tmp_path: Path) -> None:
    """The upgrade keeps what existing people could do: decide approvals."""
    import sqlite3

    from guard.storage import Migrations
    from worker_server.inbox.accounts import STEPS, Accounts

    path = tmp_path / "old.db"
    db = await open_database(path)
    await db.migrate_component("inbox", Migrations(sqlite=STEPS.sqlite[:1]))  # the schema before roles
    await db.write(lambda c: c.execute("INSERT INTO inbox_humans (name, created_at) VALUES ('old', 0)"))
    from guard.storage.clock import SystemClock

    accounts = Accounts(db, SystemClock())
    assert await accounts.role_of("old") == "approver"
    await accounts.add("new", "http://x/inbox")
    assert await accounts.role_of("new") == "worker"
    await db.close()
    assert sqlite3.connect(path).execute("SELECT version FROM schema_versions WHERE component = 'inbox'").fetchone()[0] == 2
