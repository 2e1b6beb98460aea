"""Who may approve and how many: roles, a rule's approvers, quorum, every decision recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.approvals import AlreadyDecided, Approvals, ApprovalStatus, NotAnApprover
from guard.approvers import may_decide
from guard.storage.clock import FakeClock
from guard.dialects import PolicyError, load_policy
from guard.policy import ApprovalSettings
from guard.schema import open_guard_db

pytestmark = pytest.mark.anyio

ARGS = {"task_id": "tsk_abc"}


@pytest.fixture
async def db(db_target: str):
    """The guard's tables in a fresh database: a SQLite file, then PostgreSQL."""
    database = await open_guard_db(db_target)
    yield database
    await database.close()


async def held(db, settings: ApprovalSettings):
    approvals = Approvals(db, FakeClock(1_700_000_000.0))
    digest = await approvals.digest("cancel-task", ARGS, "agent")
    approval = await approvals.open(digest, "cancel-task", ARGS, "agent", "s1", "cancel-task#1", "why", 900, settings)
    return approvals, approval


def test_roles_include_the_lesser_ones_and_names_are_named_people() -> None:
    assert not may_decide(None, (), "wes", "worker")
    assert may_decide(None, (), "ann", "approver") and may_decide(None, (), "ada", "admin")
    assert may_decide(None, (), "op", None)  # the operator at the terminal
    assert may_decide(["wes"], (), "Wes", "worker")  # a named person decides whatever their role
    assert not may_decide(["wes"], (), "ann", "approver")
    assert may_decide(["admin"], (), "ada", "admin") and not may_decide(["admin"], (), "ann", "approver")
    assert may_decide(["wes"], ["admin"], "ada", "admin")  # escalation group


async def test_quorum_two_of_three_one_keeps_it_pending_the_second_approves(db) -> None:
    approvals, a = await held(db, ApprovalSettings(approvers=("ann", "bob", "cy"), quorum=2))
    first = await approvals.decide(a.id, True, "ann", "fine", channel="inbox", role="approver")
    assert first.status is ApprovalStatus.PENDING and first.approvals_so_far == 1
    with pytest.raises(AlreadyDecided):
        await approvals.decide(a.id, True, "ANN", role="approver")
    with pytest.raises(NotAnApprover):
        await approvals.decide(a.id, True, "dora", role="admin")
    second = await approvals.decide(a.id, True, "bob", channel="link", role="worker")
    assert second.status is ApprovalStatus.APPROVED
    assert second.decided_by == "ann, bob" and second.decision_note == "ann: fine"
    recorded = [(d.decided_by, d.decision, d.channel, d.comment) for d in await approvals.decisions(a.id)]
    assert recorded == [("ann", "approve", "inbox", "fine"), ("bob", "approve", "link", None)]


async def test_one_denial_denies_even_after_an_approval(db) -> None:
    approvals, a = await held(db, ApprovalSettings(approvers=("ann", "bob", "cy"), quorum=2))
    await approvals.decide(a.id, True, "ann", role="approver")
    denied = await approvals.decide(a.id, False, "cy", "not today", channel="cli", role="approver")
    assert denied.status is ApprovalStatus.DENIED and denied.decision_note == "not today"
    assert [d.decision for d in await approvals.decisions(a.id)] == ["approve", "deny"]


async def test_a_worker_cannot_decide_by_default(db) -> None:
    approvals, a = await held(db, ApprovalSettings())
    with pytest.raises(NotAnApprover, match="wes may not decide"):
        await approvals.decide(a.id, True, "wes", role="worker")
    assert (await approvals.get(a.id)).status is ApprovalStatus.PENDING
    assert await approvals.decisions(a.id) == []


def _policy(tmp_path: Path, approval: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: '1'\ntools:\n  cancel-task:\n    rules:\n      - action: require_approval\n"
        f"        approval: {approval}\n"
    )
    return path


def test_the_policy_reads_approvers_quorum_and_escalation(tmp_path: Path) -> None:
    policy = load_policy(_policy(
        tmp_path, "{approvers: [alice, approver], quorum: 2, escalate_after_s: 60, escalate_to: [admin]}"))
    settings = policy.tools["cancel-task"][0].approval
    assert settings.approvers == ("alice", "approver") and settings.quorum == 2
    assert settings.escalate_after_s == 60 and settings.escalate_to == ("admin",)


@pytest.mark.parametrize(
    ("approval", "message"),
    [
        ("{approvers: [alice, bob], quorum: 3}", "quorum: needs 3 approvals but only 2 approver(s) are named"),
        ("{approvers: []}", "empty list lets nobody approve"),
        ("{quorum: 0}", "quorum"),
        ("{escalate_to: [admin]}", "escalate_to needs escalate_after_s"),
        ("{escalate_after_s: 30}", "escalate_after_s needs escalate_to"),
    ],
)
def test_policy_check_names_the_bad_key(tmp_path: Path, approval: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(_policy(tmp_path, approval))
    assert message in str(caught.value)
    assert "p.yaml:6: tools.cancel-task.rules[0].approval" in str(caught.value)
