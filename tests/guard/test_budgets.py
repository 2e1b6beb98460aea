"""Spend budgets in the guard: the policy key, admit's refusal, the ledger's exactness."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

from guard import policy_cli
from guard.budgets import BudgetLedger, BudgetTarget, admitted_budgets
from guard.storage.clock import FakeClock, SystemClock
from guard.storage import open_database
from guard.dialects import PolicyError, load_policy
from guard.gate import Guard
from guard.middleware import GuardMiddleware
from guard.schema import open_guard_db

pytestmark = pytest.mark.anyio

DAY = 86_400
BUDGET_POLICY = """\
    tools:
      start:
        rules:
          - action: allow
            budget: {tokens: 1000, window: day, scope: identity, name: daily}
    """


@asynccontextmanager
async def guarded(
    tmp_path: Path, db_target: str, policy: str, clock: FakeClock
) -> AsyncIterator[tuple[MCPServer[Any], Guard]]:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(textwrap.dedent(policy))
    db = await open_database(db_target)
    feed = db.change_feed()
    feed.start()
    guard = await Guard.open(db, feed, policy_path=policy_file, clock=clock)
    server: MCPServer[Any] = MCPServer("guarded", middleware=[GuardMiddleware(guard)])

    @server.tool(name="start")
    async def start() -> str:
        """Start work: say which budget keys it would charge."""
        return ",".join(f"{t.name}/{t.scope}/{t.scope_value}" for t in admitted_budgets())

    guard.set_tools(server)
    try:
        yield server, guard
    finally:
        await guard.audit.flush()
        feed.close()
        await db.close()


async def test_a_budget_admits_until_spent_then_refuses_with_the_time_room_frees(
    tmp_path: Path, db_target: str
) -> None:
    clock = FakeClock(1_700_000_000.0)
    async with guarded(tmp_path, db_target, BUDGET_POLICY, clock) as (server, guard), Client(server) as client:
        first = await client.call_tool("start", {})
        assert first.is_error is False
        # The handler is told which budget keys the turns it starts charge.
        (target_text,) = [c.text for c in first.content]
        assert target_text.startswith("daily/identity/")
        identity = target_text.split("/")[2]
        targets = [BudgetTarget("daily", "start#1", "identity", identity, DAY, tokens=1000)]

        assert await guard.budgets.charge(targets, {"tokens": 600}) == []
        clock.advance(100)
        assert (await client.call_tool("start", {})).is_error is False
        assert await guard.budgets.charge(targets, {"tokens": 400}) == []  # exactly the limit: spent, not over
        clock.advance(100)

        refused = await client.call_tool("start", {})
        assert refused.is_error is True
        data = refused.structured_content
        assert data["error"] == "budget_exhausted"
        assert data["rule"] == "start#1" and data["budget"] == "daily"
        assert data["reason"] == "tokens 1,000 of 1,000 per day per identity"
        assert data["used"] == {"tokens": 1000}
        # The 600 charged at t0 leave the window at t0 + 1 day: 200 s have passed.
        assert data["retry_after_s"] == DAY - 200
        assert refused.content[0].text.startswith(
            "budget_exhausted: start: tokens 1,000 of 1,000 per day per identity; retry after 86200.0 s."
        )

        clock.advance(DAY - 200 - 1)
        assert (await client.call_tool("start", {})).structured_content["error"] == "budget_exhausted"
        clock.advance(1)
        assert (await client.call_tool("start", {})).is_error is False

        decisions = [e.decision for e in await guard.audit.query(tool="start")]
        assert decisions.count("budget_exhausted") == 2


async def test_shadow_mode_admits_a_spent_budget_and_records_it(tmp_path: Path, db_target: str) -> None:
    clock = FakeClock(1_700_000_000.0)
    async with guarded(tmp_path, db_target, "mode: shadow\n" + textwrap.dedent(BUDGET_POLICY), clock) as (server, guard), \
            Client(server) as client:  # fmt: skip
        identity = (await client.call_tool("start", {})).content[0].text.split("/")[2]
        target = BudgetTarget("daily", "start#1", "identity", identity, DAY, tokens=1000, shadow=True)
        over = await guard.budgets.charge([target], {"tokens": 1500}, task="tsk_x")
        assert [s.message for s in over] == ["tokens 1,500 of 1,000 per day per identity"]
        assert (await client.call_tool("start", {})).is_error is False
        decisions = [e.decision for e in await guard.audit.query(tool="start")]
        assert "shadow_budget_exhausted" in decisions
        (crossing,) = await guard.budgets.overruns()
        assert crossing["shadow"] is True and crossing["task"] == "tsk_x"


async def test_cost_and_worker_time_sum_exactly(db_target: str) -> None:
    db = await open_guard_db(db_target)
    try:
        ledger = BudgetLedger(db, FakeClock(1000.0))
        target = BudgetTarget("b", "r#1", "global", "", 60, cost_usd=0.3, worker_s=2)
        for _ in range(3):
            assert await ledger.charge([target], {"cost_usd": 0.1}) == []  # 0.1 * 3 is not > 0.3
        (over,) = await ledger.charge([target], {"cost_usd": 0.000001, "worker_s": 1})
        assert over.metric == "cost_usd" and over.message == "cost $0.300001 of $0.3 per minute across all callers"
        (use,) = await ledger.uses([target])
        assert use.used == {"tokens": 0, "cost_usd": 0.300001, "worker_s": 1.0}
    finally:
        await db.close()


CHARGER = """
import anyio, sys
from guard.budgets import BudgetLedger, BudgetTarget
from guard.storage.clock import SystemClock
from guard.storage import open_database

async def main() -> None:
    db = await open_database(sys.argv[1])
    ledger = BudgetLedger(db, SystemClock())
    target = BudgetTarget("shared", "r#1", "global", "", 3600, tokens=1000)
    for _ in range(200):
        for spent in await ledger.charge([target], {"tokens": 7}):
            print(int(spent.used))
    await db.close()

anyio.run(main)
"""


async def test_two_processes_charging_one_budget_stay_exact(db_target: str) -> None:
    path = db_target  # one SQLite file, or one PostgreSQL database both processes connect to
    await (await open_guard_db(path)).close()  # the tables, made once before both start
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", CHARGER, path], cwd=root, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    over = sorted(int(v) for out in outputs for v in out.split())
    # 400 charges of 7: every sum a charge saw is distinct, and the first one
    # over 1000 is the 143rd charge (1001); the 257 after it see 1008..2800.
    assert over == [7 * n for n in range(143, 401)]
    db = await open_guard_db(path)
    try:
        (use,) = await BudgetLedger(db, SystemClock()).report()
        assert use.used["tokens"] == 2800
    finally:
        await db.close()


def test_the_budget_key_is_read_with_file_and_line_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent(BUDGET_POLICY))
    (rule,) = load_policy(good).tools["start"]
    assert rule.budget is not None
    assert (rule.budget.tokens, rule.budget.window_s, rule.budget.scope, rule.budget.name) == (1000, DAY, "identity", "daily")

    cases = {
        "tools:\n  start:\n    rules:\n      - action: allow\n        budget: {window: day}\n": (
            5, "at least one of tokens, cost_usd, worker_s"),
        "tools:\n  start:\n    rules:\n      - action: deny\n        budget: {tokens: 5, window: day}\n": (
            5, "a deny rule refuses every call"),
        "tools:\n  start:\n    rules:\n      - action: allow\n        budget: {tokens: 5, window: day, per: x}\n": (
            5, "per"),
        "tools:\n  start:\n    rules:\n      - action: allow\n        budget: {tokens: -1, window: day}\n": (
            5, "tokens"),
    }
    for n, (text, (line, fragment)) in enumerate(cases.items()):
        path = tmp_path / f"bad{n}.yaml"
        path.write_text(text)
        with pytest.raises(PolicyError) as caught:
            load_policy(path)
        assert str(caught.value).startswith(f"{path}:{line}: "), str(caught.value)
        assert fragment in str(caught.value)


async def test_policy_explain_shows_the_budget_and_its_use(tmp_path: Path, db_target: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(textwrap.dedent(BUDGET_POLICY))
    db_path = db_target
    db = await open_guard_db(db_path)
    await BudgetLedger(db, SystemClock()).charge(
        [BudgetTarget("daily", "start#1", "identity", "alice", DAY, tokens=1000)], {"tokens": 250}
    )
    await db.close()
    out = StringIO()
    # policy explain runs its own event loop (it is a CLI verb): run it off this one.
    import anyio

    code = await anyio.to_thread.run_sync(
        lambda: policy_cli.explain(policy, "start", "{}", "alice", out=out, db_path=db_path)
    )
    assert code == 0
    text = out.getvalue()
    assert "daily (start#1): tokens 1,000 per day per identity" in text
    assert "now: daily [identity alice]: used tokens 250 of 1,000 per day per identity" in text


def test_an_intercept_usage_counter_is_a_budget(tmp_path: Path) -> None:
    path = tmp_path / "intercept.yaml"
    path.write_text(textwrap.dedent("""\
        version: "1"
        tools:
          spawn-task:
            rules:
              - name: "daily tokens"
                conditions:
                  - {path: "state.spawn-task.tokens", op: "lte", value: 2000000}
                state: {counter: "tokens", window: "day", increment_from: "usage.tokens"}
        """))
    (rule,) = load_policy(path).tools["spawn-task"]
    assert rule.rate_limit is None and rule.conditions == ()
    assert rule.budget is not None
    assert (rule.budget.tokens, rule.budget.window_s, rule.budget.scope) == (2_000_000, DAY, "global")

    # Without its limit, or read by another rule, it is an error at its line.
    path.write_text(textwrap.dedent("""\
        version: "1"
        tools:
          spawn-task:
            rules:
              - name: "daily tokens"
                conditions:
                  - {path: "args.prompt", op: "exists"}
                state: {counter: "tokens", window: "day", increment_from: "usage.bananas"}
        """))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}:8: ") and "usage.tokens" in str(caught.value)
