"""Spend budgets end to end: real servers, the real Codex and Claude Code CLIs, the fake model.

The policy's budgets are charged with the usage the workers report; the fake
model (fixtures/fake_model.py) answers with usage each test chooses.
"""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.fake_model import FakeModel
from tests.raw_jsonrpc import stdio_peer
from tests.real_cli import cli_workspace, processes_of
from tests.support import Workspace, call, call_error, spawn_and_wait, stdio_client

pytestmark = pytest.mark.anyio

DAY = 86_400
# Whatever Claude Code makes of this command (it may refuse it), the model's
# next answer stalls for a minute: only a stop ends the turn sooner.
SLOW = "python3 -c 'import time; time.sleep(60)'"


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as fake:
        yield fake


def budget_workspace(tmp_path: Path, model: FakeModel, budget: str, *, mode: str = "enforce") -> Workspace:
    """A server whose spawn-task and message-task share one budget (named ``spend``)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            default: allow
            mode: {mode}
            tools:
              spawn-task:
                rules:
                  - action: allow
                    budget: {{{budget}, name: spend}}
              message-task:
                rules:
                  - action: allow
                    budget: {{{budget}, name: spend}}
            """
        )
    )
    return cli_workspace(tmp_path, model, policy=policy)


async def test_codex_turns_are_charged_at_turn_completed_until_the_budget_is_spent(
    tmp_path: Path, model: FakeModel
) -> None:
    # Each Codex turn reports 1,200 input + 30 output tokens at turn.completed.
    ws = budget_workspace(tmp_path, model, "tokens: 2460, window: day, scope: identity")
    mark = model.script("spend", [{"reply": "done {turn}"}])
    async with stdio_client(ws) as client:
        started = time.monotonic()
        for n in (1, 2):
            done = await spawn_and_wait(client, f"{mark} turn {n}", worker="codex", cwd=str(ws.work))
            assert done["status"] == "completed", done
            assert done["usage"]["input_tokens"] + done["usage"]["output_tokens"] == 1230
            used = ws.cli("budgets").stdout
            assert f"spend [identity tester]: tokens {1230 * n:,} of 2,460 per day per identity" in used, used
        refused = await call_error(client, "spawn-task", {"prompt": f"{mark} turn 3", "worker": "codex",
                                                          "cwd": str(ws.work)})  # fmt: skip
        data = refused.structured_content
        assert data["error"] == "budget_exhausted"
        assert data["reason"] == "tokens 2,460 of 2,460 per day per identity"
        assert data["rule"] == "spawn-task#1" and data["budget"] == "spend"
        # Room frees when the first turn's charge leaves the day.
        assert DAY - (time.monotonic() - started) - 5 <= data["retry_after_s"] <= DAY
        assert refused.content[0].text.startswith("budget_exhausted: spawn-task: tokens 2,460 of 2,460")
        # message-task charges the same budget: refused too.
        again = await call_error(client, "message-task", {"task_id": done["task_id"], "message": "more"})
        assert again.structured_content["error"] == "budget_exhausted"
    assert len(model.scripted("spend")) == 2


async def test_a_claude_turn_that_crosses_the_budget_mid_turn_is_stopped_with_its_partial_output(
    tmp_path: Path, model: FakeModel
) -> None:
    ws = budget_workspace(tmp_path, model, "tokens: 10000, window: day, scope: identity")
    # The model says something, then asks to run a long command; the message
    # carrying 20,000 input tokens crosses the budget before the command ends.
    mark = model.script("big", [{"say": "half of the work is done", "shell": SLOW,
                                 "usage": {"input_tokens": 20000}}, {"reply": "all done", "stall": 60}])  # fmt: skip
    async with stdio_client(ws) as client:
        started = time.monotonic()
        done = await spawn_and_wait(client, f"{mark} work", worker="claude", cwd=str(ws.work), timeout_s=45)
        elapsed = time.monotonic() - started
        assert done["status"] == "failed", done
        message = done["status_message"]
        found = re.fullmatch(r"budget exhausted: tokens ([\d,]+) of 10,000 per day per identity", message)
        assert found, message
        assert 20_000 < int(found.group(1).replace(",", "")) < 21_000
        # Its partial work: the last thing the agent said, and the log tail.
        assert done["output"]["final"] == "half of the work is done"
        assert "half of the work is done" in done["output"]["tail"]
        assert elapsed < 45  # stopped, not left to run its 60 s command
        assert processes_of(done["task_id"]) == []
    shown = ws.cli("budgets").stdout
    assert f"stopped {done['task_id']}: {message.removeprefix('budget exhausted: ')}" in shown, shown


async def test_worker_time_stops_a_long_shell_turn(tmp_path: Path, model: FakeModel) -> None:
    ws = budget_workspace(tmp_path, model, "worker_s: 2, window: hour, scope: session")
    async with stdio_client(ws) as client:
        started = time.monotonic()
        done = await spawn_and_wait(client, "echo started; sleep 600", worker="shell", cwd=str(ws.work), timeout_s=40)
        elapsed = time.monotonic() - started
        assert done["status"] == "failed", done
        assert re.fullmatch(r"budget exhausted: worker time 2\.\d s of 2\.0 s per hour per session",
                            done["status_message"]), done["status_message"]  # fmt: skip
        assert done["output"]["final"] == "started"
        assert elapsed < 30
        assert processes_of(done["task_id"]) == []


async def test_max_tokens_narrows_below_the_budget_and_message_task_inherits_it(
    tmp_path: Path, model: FakeModel
) -> None:
    ws = budget_workspace(tmp_path, model, "tokens: 1000000, window: day, scope: identity")
    mark = model.script("capped", [{"say": "started on it", "shell": SLOW,
                                    "usage": {"input_tokens": 20000}}, {"reply": "all done", "stall": 60}])  # fmt: skip
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(client, f"{mark} work", worker="claude", cwd=str(ws.work), timeout_s=45,
                                    max_tokens=5000)  # fmt: skip
        assert done["status"] == "failed", done
        assert re.fullmatch(r"budget exhausted: tokens 20,\d{3} of 5,000 per task \(max_tokens\)",
                            done["status_message"]), done["status_message"]  # fmt: skip
        assert done["output"]["final"] == "started on it"
        # The next turn of the session runs under the same cap.
        second = await call(client, "message-task", {"task_id": done["task_id"], "message": f"{mark} again"})
        waited = await call(client, "wait-task", {"task_ids": second["task_id"], "timeout_s": 45})
        (again,) = waited["tasks"]
        assert again["status"] == "failed", again
        assert again["status_message"].endswith("of 5,000 per task (max_tokens)")
        # A cap is a positive number of tokens.
        refused = await call_error(client, "spawn-task", {"prompt": "x", "worker": "shell", "cwd": str(ws.work),
                                                          "max_tokens": 0})  # fmt: skip
        assert refused.structured_content["error"] == "invalid_arguments"


async def test_shadow_mode_stops_nothing_and_records_what_it_would_have_stopped(
    tmp_path: Path, model: FakeModel
) -> None:
    ws = budget_workspace(tmp_path, model, "tokens: 1000, window: day, scope: identity", mode="shadow")
    mark = model.script("shadow", [{"reply": "finished anyway"}])
    async with stdio_client(ws) as client:
        done = await spawn_and_wait(client, f"{mark} work", worker="claude", cwd=str(ws.work))
        assert done["status"] == "completed", done
        assert done["output"]["final"] == "finished anyway"
        # Spent, but shadow mode admits the next call.
        more = await spawn_and_wait(client, "echo still allowed", worker="shell", cwd=str(ws.work))
        assert more["status"] == "completed", more
    shown = ws.cli("budgets").stdout
    assert re.search(rf"would have stopped \(shadow\) {done['task_id']}: tokens 1,\d{{3}} of 1,000 per day", shown), shown
    audit = ws.cli("audit", "--decision", "shadow_budget_exhausted").stdout
    assert "spawn-task" in audit


async def test_a_task_augmented_spawn_is_charged_and_stopped_too(tmp_path: Path, model: FakeModel) -> None:
    # tools/call with a task (2025-11-25 tasks/*) passes the same guard: its
    # turn carries the budget and worker time stops it.
    ws = budget_workspace(tmp_path, model, "worker_s: 1, window: hour, scope: session")
    async with stdio_peer(ws) as peer:
        await peer.initialize({"tasks": {"list": {}, "cancel": {}}})
        created = await peer.request(
            "tools/call", {"name": "spawn-task", "arguments": {"prompt": "say waiting\nsleep 60"}, "task": {}}
        )
        task_id = created["task"]["taskId"]
        result = await peer.request("tasks/result", {"taskId": task_id})
        assert result["isError"] is True
        message = result["structuredContent"]["status_message"]
        assert re.fullmatch(r"budget exhausted: worker time 1\.\d s of 1\.0 s per hour per session", message), message
        assert result["structuredContent"]["output"]["final"] == "waiting"
