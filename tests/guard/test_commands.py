"""The approvals and audit CLI verbs, as a human at a terminal sees them."""

from __future__ import annotations

import getpass
import json
from io import StringIO
from pathlib import Path

import anyio
import pytest

from guard import commands
from guard.approvals import Approval, Approvals
from guard.audit import AuditLog, AuditRecord
from guard.storage.clock import FakeClock
from guard.schema import open_guard_db

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20.000Z


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "taskwarden.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


async def open_approval(
    db_path: Path, clock: FakeClock, args: dict | None = None, expires_s: float = 900
) -> Approval:
    """What the server does when a call needs approval (in its own connection)."""
    args = args or {"task_id": "t_1"}
    db = await open_guard_db(db_path)
    try:
        approvals = Approvals(db, clock)
        return await approvals.open(
            await approvals.digest("cancel-task", args, "alice"), "cancel-task", args, "alice", "s1",
            "cancel-task#1", "needs a human", expires_s,
        )  # fmt: skip
    finally:
        await db.close()


async def add_audit(db_path: Path, clock: FakeClock, *records: AuditRecord) -> None:
    """What the server does after each call (in its own connection)."""
    db = await open_guard_db(db_path)
    try:
        log = AuditLog(db, clock)
        for record in records:
            await log.record(record)
    finally:
        await db.close()


def record(tool: str, decision: str, **extra) -> AuditRecord:
    return AuditRecord(identity="alice", session="s1", tool=tool, args={"x": 1}, decision=decision, **extra)


# -- approvals ----------------------------------------------------------------


async def test_list_when_there_are_none(db_path) -> None:
    out = StringIO()
    assert await commands.approvals_list(db_path, False, out) == 0
    assert out.getvalue() == "no approvals\n"


async def test_list_shows_pending_approvals_and_how_to_decide(db_path, clock) -> None:
    approval = await open_approval(db_path, clock, {"task_id": "t_1", "token": "s3cr3t"})
    out = StringIO()
    assert await commands.approvals_list(db_path, False, out, clock=clock) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["ID", "STATUS", "TOOL", "IDENTITY", "CREATED", "EXPIRES", "DECIDED", "BY", "ARGS"]
    assert lines[1].split() == [
        approval.id, "pending", "cancel-task", "alice", "2023-11-14T22:13:20.000Z", "2023-11-14T22:28:20.000Z", "-",
        '{"task_id":"t_1","token":"[REDACTED]"}',
    ]  # fmt: skip
    assert "taskwarden approvals approve ID" in out.getvalue()
    assert "taskwarden approvals deny ID --reason TEXT" in out.getvalue()


async def test_list_as_json(db_path, clock) -> None:
    approval = await open_approval(db_path, clock)
    out = StringIO()
    assert await commands.approvals_list(db_path, True, out, clock=clock) == 0
    (item,) = json.loads(out.getvalue())
    assert item["id"] == approval.id
    assert item["status"] == "pending"
    assert item["args"] == {"task_id": "t_1"}
    assert item["expires_at"] == "2023-11-14T22:28:20.000Z"
    assert item["how_to_approve"].startswith(f"Ask a human to run `taskwarden approvals approve {approval.id}`")


async def test_list_marks_overdue_approvals_expired(db_path, clock) -> None:
    await open_approval(db_path, clock, expires_s=60)
    clock.advance(61)
    out = StringIO()
    await commands.approvals_list(db_path, True, out, clock=clock)
    assert [a["status"] for a in json.loads(out.getvalue())] == ["expired"]


async def test_approve_as_the_os_user_by_default(db_path, clock) -> None:
    approval = await open_approval(db_path, clock)
    out = StringIO()
    assert await commands.approvals_approve(db_path, approval.id, None, None, out, clock=clock) == 0
    assert out.getvalue() == (
        f"approved {approval.id}: cancel-task for alice (by {getpass.getuser()}). "
        "Its next identical call will run, until 2023-11-14T22:28:20.000Z.\n"
    )


async def test_approve_with_a_name_and_comment(db_path, clock) -> None:
    approval = await open_approval(db_path, clock)
    assert await commands.approvals_approve(db_path, approval.id, "bob", "ok for today", StringIO(), clock=clock) == 0
    out = StringIO()
    await commands.approvals_list(db_path, True, out, clock=clock)
    (item,) = json.loads(out.getvalue())
    assert (item["status"], item["decided_by"], item["decision_note"]) == ("approved", "bob", "ok for today")


async def test_approving_twice_reports_who_decided_first(db_path, clock) -> None:
    approval = await open_approval(db_path, clock)
    await commands.approvals_deny(db_path, approval.id, "not now", StringIO(), by="carol", clock=clock)
    out = StringIO()
    assert await commands.approvals_approve(db_path, approval.id, "bob", None, out, clock=clock) == 1
    assert out.getvalue() == (
        f"error: {approval.id} is already denied by carol at 2023-11-14T22:13:20.000Z; the first answer stands\n"
    )


async def test_approve_unknown_or_expired(db_path, clock) -> None:
    out = StringIO()
    assert await commands.approvals_approve(db_path, "apr_missing00", "bob", None, out, clock=clock) == 1
    assert out.getvalue() == "error: no approval apr_missing00\n"

    approval = await open_approval(db_path, clock, expires_s=60)
    clock.advance(120)
    out = StringIO()
    assert await commands.approvals_approve(db_path, approval.id, "bob", None, out, clock=clock) == 1
    assert out.getvalue() == (
        f"error: {approval.id} expired at 2023-11-14T22:14:20.000Z; it can no longer be decided\n"
    )


async def test_deny_requires_a_reason(db_path, clock) -> None:
    approval = await open_approval(db_path, clock)
    for reason in (None, "", "  "):
        out = StringIO()
        assert await commands.approvals_deny(db_path, approval.id, reason, out, clock=clock) == 2
        assert "a reason is required" in out.getvalue()
    out = StringIO()
    await commands.approvals_list(db_path, True, out, clock=clock)
    assert json.loads(out.getvalue())[0]["status"] == "pending"


async def test_deny(db_path, clock) -> None:
    approval = await open_approval(db_path, clock)
    out = StringIO()
    assert await commands.approvals_deny(db_path, approval.id, "wrong task", out, by="carol", clock=clock) == 0
    assert out.getvalue() == f"denied {approval.id}: cancel-task for alice (by carol): wrong task\n"


# -- audit --------------------------------------------------------------------


async def test_audit_table(db_path, clock) -> None:
    await add_audit(
        db_path,
        clock,
        record("spawn-task", "allow", outcome="ok", duration_ms=3.5, rule="spawn-task#1"),
        record("cancel-task", "approval_required", reason="needs a human", approval_id="apr_abcdefghij"),
    )
    out = StringIO()
    assert await commands.audit(db_path, False, None, None, None, False, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["TIME", "DECISION", "TOOL", "IDENTITY", "OUTCOME", "MS", "RULE", "DETAIL"]
    assert lines[1].split() == ["2023-11-14T22:13:20.000Z", "allow", "spawn-task", "alice", "ok", "3.5", "spawn-task#1"]
    assert lines[2].split() == [
        "2023-11-14T22:13:20.000Z", "approval_required", "cancel-task", "alice", "-", "-", "-",
        "needs", "a", "human", "[apr_abcdefghij]",
    ]  # fmt: skip


async def test_audit_empty(db_path) -> None:
    out = StringIO()
    assert await commands.audit(db_path, False, None, None, None, False, out) == 0
    assert out.getvalue() == "no audit records\n"


async def test_audit_json_lines_with_filters(db_path, clock) -> None:
    await add_audit(db_path, clock, record("spawn-task", "allow"))
    clock.advance(3600)
    await add_audit(db_path, clock, record("spawn-task", "rate_limited"), record("cancel-task", "deny"))

    async def run(**kwargs) -> list[dict]:
        args = dict(as_json=True, since=None, tool=None, decision=None, follow=False)
        args.update(kwargs)
        out = StringIO()
        assert await commands.audit(db_path, out=out, clock=clock, **args) == 0
        return [json.loads(line) for line in out.getvalue().splitlines()]

    assert [r["decision"] for r in await run()] == ["allow", "rate_limited", "deny"]
    assert [r["decision"] for r in await run(tool="spawn-task")] == ["allow", "rate_limited"]
    assert [r["tool"] for r in await run(decision="deny")] == ["cancel-task"]
    assert [r["decision"] for r in await run(since="10m")] == ["rate_limited", "deny"]
    assert [r["decision"] for r in await run(since="2h")] == ["allow", "rate_limited", "deny"]
    assert [r["decision"] for r in await run(since="2023-11-14T22:30:00.000Z")] == ["rate_limited", "deny"]
    assert [r["decision"] for r in await run(since="2023-11-14T23:30:00+01:00")] == ["rate_limited", "deny"]
    assert await run(since="2023-11-15") == []
    assert (await run())[0]["time"] == "2023-11-14T22:13:20.000Z"
    # --limit keeps the newest rows.
    assert [r["decision"] for r in await run(limit=2)] == ["rate_limited", "deny"]


async def test_audit_bad_input(db_path) -> None:
    out = StringIO()
    assert await commands.audit(db_path, False, "yesterday", None, None, False, out) == 2
    assert "--since" in out.getvalue() and "'yesterday'" in out.getvalue()
    out = StringIO()
    assert await commands.audit(db_path, False, None, None, "maybe", False, out) == 2
    assert "decision must be one of allow, deny" in out.getvalue()


async def test_audit_follow_prints_new_rows(db_path, clock) -> None:
    await add_audit(db_path, clock, record("spawn-task", "allow"))
    out = StringIO()
    stop = anyio.Event()

    async def follow() -> None:
        await commands.audit(db_path, True, None, None, None, True, out, poll_interval_s=0.05, stop=stop)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await add_audit(db_path, clock, record("cancel-task", "deny"), record("list-tasks", "allow"))
        with anyio.move_on_after(10):
            while out.getvalue().count("\n") < 3:
                await anyio.sleep(0.02)
        stop.set()
    assert [json.loads(line)["tool"] for line in out.getvalue().splitlines()] == [
        "spawn-task",
        "cancel-task",
        "list-tasks",
    ]
