"""Agent tasks through a real MCP client over stdio, against a real server and the fake agent."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import anyio
import psutil
import pytest

from tests.support import (
    Workspace,
    call,
    call_error,
    host_pid,
    marked_processes,
    pid_alive,
    server_process,
    spawn_and_wait,
    stdio_client,
    text_of,
    wait_until,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


async def test_spawn_wait_completed_with_final_message(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        task = await call(client, "spawn-task", {"prompt": "say looking around\nsay all done: 42 files"})
        assert task["status"] in ("queued", "working")
        assert task["task_id"].startswith("tsk_")
        assert task["next_action"].startswith("Call wait-task")

        result = await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": 30})
        assert result["timed_out"] is False
        assert result["still_waiting"] == []
        done = result["tasks"][0]
        assert done["status"] == "completed"
        assert done["output"]["final"] == "all done: 42 files"
        assert done["exit_code"] == 0
        assert "looking around" in done["output"]["tail"]
        assert done["output"]["log_uri"] == f"task://{task['task_id']}/log"
        assert "message-task" in done["next_action"]


async def test_message_task_resumes_the_same_agent_session(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        first = await spawn_and_wait(client, "say remember the word 'heron'")
        assert first["status"] == "completed"

        second = await call(client, "message-task", {"task_id": first["task_id"], "message": "history"})
        assert second["session_id"] == first["session_id"]
        assert second["turn"] == 2
        assert second["task_id"] != first["task_id"]
        done = (await call(client, "wait-task", {"task_ids": [second["task_id"]]}))["tasks"][0]
        assert done["status"] == "completed"
        # The fake agent was started with `resume <its own session id>` and
        # remembers the earlier turn's prompt.
        assert "resumed session fake-" in done["output"]["tail"]
        assert done["output"]["final"] == "turn 1 prompt: say remember the word 'heron'"

        detail = await call(client, "get-task", {"task_id": second["task_id"]})
        assert [t["turn"] for t in detail["turns"]] == [1, 2]
        assert [t["status"] for t in detail["turns"]] == ["completed", "completed"]


async def test_message_on_a_busy_session_queues_behind_the_running_turn(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        first = await call(client, "spawn-task", {"prompt": "sleep 1.5\nsay first"})
        second = await call(client, "message-task", {"task_id": first["task_id"], "message": "say second"})
        assert second["status"] == "queued"
        result = await call(client, "wait-task", {"task_ids": [first["task_id"], second["task_id"]], "mode": "all"})
        by_id = {t["task_id"]: t for t in result["tasks"]}
        assert by_id[first["task_id"]]["output"]["final"] == "first"
        assert by_id[second["task_id"]]["output"]["final"] == "second"
        assert by_id[second["task_id"]]["updated_at"] >= by_id[first["task_id"]]["updated_at"]


async def test_tasks_beyond_max_concurrent_wait_queued_in_order(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, max_concurrent=1)
    go = ws.work / "go"
    async with stdio_client(ws) as client:
        first = await call(client, "spawn-task", {"prompt": f"wait-for {go}\nsay done 0"})
        ids = [first["task_id"]]
        for i in (1, 2):
            ids.append((await call(client, "spawn-task", {"prompt": f"say done {i}"}))["task_id"])

        # The first holds the only slot until told to go; the others wait.
        await wait_until_status(client, ids[0], "working")
        page = await call(client, "list-tasks", {})
        by_id = {t["task_id"]: t["status"] for t in page["tasks"]}
        assert [by_id[i] for i in ids] == ["working", "queued", "queued"]

        go.touch()
        done = await call(client, "wait-task", {"task_ids": ids, "mode": "all", "timeout_s": 30})
        assert [t["status"] for t in done["tasks"]] == ["completed"] * 3
        finished = [t["updated_at"] for t in done["tasks"]]
        assert finished == sorted(finished), "queued tasks ran in the order they were spawned"


async def wait_until_status(client, task_id: str, status: str) -> None:  # noqa: ANN001
    for _ in range(400):
        if (await call(client, "get-task", {"task_id": task_id}))["status"] == status:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"{task_id} never became {status}")


async def test_timeout_fails_the_task_as_timed_out(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        pidfile = ws.work / "worker.pid"
        spawned = await call(client, "spawn-task", {"prompt": f"pid {pidfile}\nsleep 60", "timeout_s": 1})
        result = await call(client, "wait-task", {"task_ids": spawned["task_id"], "timeout_s": 30})
        task = result["tasks"][0]
        assert task["status"] == "failed"
        assert task["status_message"] == "timed_out"
        assert pidfile.exists()
        assert not marked_processes(spawned["task_id"])


async def test_failing_exit_code_fails_the_task(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        task = await spawn_and_wait(client, "say trying\nexit 3")
        assert task["status"] == "failed"
        assert task["exit_code"] == 3
        assert task["status_message"].startswith("exit 3")
        assert "See status_message" in task["next_action"]


async def test_cancel_a_list_with_all_three_outcomes_and_no_grandchild_survives(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        finished = await spawn_and_wait(client, "say quick")
        gc_file = ws.work / "grandchild.pid"
        running = await call(client, "spawn-task", {"prompt": f"grandchild {gc_file}\nsleep 120"})
        await wait_until(lambda: gc_file.exists() and gc_file.read_text())
        grandchild = host_pid(running["task_id"], int(gc_file.read_text()))
        assert pid_alive(grandchild)

        result = await call(
            client,
            "cancel-task",
            {"task_id": [running["task_id"], finished["task_id"], "tsk_doesnotexist"], "reason": "changed my mind"},
        )
        assert result == {
            "cancelled": [running["task_id"]],
            "already_terminal": [finished["task_id"]],
            "not_found": ["tsk_doesnotexist"],
        }
        assert not pid_alive(grandchild)
        task = await call(client, "get-task", {"task_id": running["task_id"]})
        assert task["status"] == "cancelled"
        assert task["status_message"] == "cancelled: changed my mind"


async def test_cancel_kills_a_worker_that_ignores_sigterm_and_an_escaped_child(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        gc_file = ws.work / "escapee.pid"
        running = await call(client, "spawn-task", {"prompt": f"ignore-term\nescapee {gc_file}\nsleep 120"})
        await wait_until(lambda: gc_file.exists() and gc_file.read_text())
        escapee = host_pid(running["task_id"], int(gc_file.read_text()))
        assert pid_alive(escapee)
        result = await call(client, "cancel-task", {"task_id": running["task_id"]})
        assert result["cancelled"] == [running["task_id"]]
        assert not pid_alive(escapee)
        log = await client.read_resource(f"task://{running['task_id']}/log")
        assert "[taskwarden] cancelled" in log.contents[0].text


async def test_cancel_a_queued_task(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, max_concurrent=1)
    async with stdio_client(ws) as client:
        first = await call(client, "spawn-task", {"prompt": "sleep 30"})
        second = await call(client, "spawn-task", {"prompt": "say never"})
        result = await call(client, "cancel-task", {"task_id": [second["task_id"]]})
        assert result["cancelled"] == [second["task_id"]]
        assert (await call(client, "get-task", {"task_id": second["task_id"]}))["status"] == "cancelled"
        await call(client, "cancel-task", {"task_id": first["task_id"]})


async def test_forty_megabytes_of_output_keep_memory_flat_and_the_result_small(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        warm = await spawn_and_wait(client, "flood 1\nsay warm")
        assert warm["status"] == "completed"
        server = server_process(ws)
        before = server.memory_info().rss
        result = await client.call_tool("wait-task", {
            "task_ids": (await call(client, "spawn-task", {"prompt": "flood 40\nsay flooded"}))["task_id"],
            "timeout_s": 50,
        })
        after = server.memory_info().rss
        task = result.structured_content["tasks"][0]
        assert task["status"] == "completed"
        assert task["output"]["final"] == "flooded"
        assert len(text_of(result).encode()) < 32 * 1024, "the result stays small"
        assert (after - before) < 25 * 1024 * 1024, f"server grew {(after - before) >> 20} MB"
        log_path = next(ws.root.glob(f"**/{task['task_id']}.log"))
        assert log_path.stat().st_size >= 40 * 1024 * 1024

        detail = await call(client, "get-task", {"task_id": task["task_id"], "tail_lines": 500})
        assert detail["output"]["truncated"] is True
        assert len(json.dumps(detail).encode()) < 32 * 1024


async def test_kill_9_mid_task_then_restart_marks_it_interrupted_and_kills_the_tree(ws: Workspace) -> None:
    gc_file = ws.work / "grandchild.pid"
    worker_file = ws.work / "worker.pid"
    async with stdio_client(ws) as client:
        bare_file = ws.work / "bare.pid"
        task = await call(
            client,
            "spawn-task",
            {"prompt": f"say started\npid {worker_file}\ngrandchild {gc_file}\nbare-child {bare_file}\nsleep 300"},
        )
        await wait_until(lambda: bare_file.exists() and bare_file.read_text())
        worker = host_pid(task["task_id"], int(worker_file.read_text()))
        grandchild = host_pid(task["task_id"], int(gc_file.read_text()))
        bare = host_pid(task["task_id"], int(bare_file.read_text()))
        assert pid_alive(worker) and pid_alive(grandchild) and pid_alive(bare)
        server = server_process(ws)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        with pytest.raises(Exception):  # noqa: B017 - the connection is gone
            with anyio.fail_after(10):
                await client.call_tool("list-tasks", {})

    async with stdio_client(ws) as client:
        after = await call(client, "get-task", {"task_id": task["task_id"]})
        assert after["status"] == "failed"
        assert after["status_message"] == "interrupted: server restarted"
        assert not pid_alive(worker)
        assert not pid_alive(grandchild)
        assert not pid_alive(bare), "a descendant without the marker (and ignoring SIGTERM) survived"

        # The worker's session id was kept: the next message resumes it.
        nxt = await call(client, "message-task", {"task_id": task["task_id"], "message": "say back again"})
        done = (await call(client, "wait-task", {"task_ids": nxt["task_id"]}))["tasks"][0]
        assert done["status"] == "completed"
        assert "resumed session fake-" in done["output"]["tail"]


async def test_queued_tasks_run_after_a_restart(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, max_concurrent=1)
    async with stdio_client(ws) as client:
        await call(client, "spawn-task", {"prompt": "sleep 300"})
        queued = await call(client, "spawn-task", {"prompt": "say ran after restart"})
        assert queued["status"] == "queued"
        server_process(ws).send_signal(signal.SIGKILL)
    async with stdio_client(ws) as client:
        done = (await call(client, "wait-task", {"task_ids": queued["task_id"], "timeout_s": 30}))["tasks"][0]
        assert done["status"] == "completed"
        assert done["output"]["final"] == "ran after restart"


async def test_a_missing_worker_binary_is_refused_at_spawn_and_the_server_keeps_serving(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        refused = await call_error(client, "spawn-task", {"prompt": "anything", "worker": "missing"})
        assert text_of(refused).startswith("invalid_arguments: worker: no-such-agent-binary-xyz CLI not found on PATH")
        ok = await spawn_and_wait(client, "say still here")
        assert ok["output"]["final"] == "still here"


@pytest.mark.parametrize(
    ("tool", "args", "field", "bound"),
    [
        ("spawn-task", {"prompt": ""}, "prompt", "at least 1"),
        ("spawn-task", {"prompt": "x" * 100_001}, "prompt", "at most 100000"),
        ("spawn-task", {"prompt": "x", "timeout_s": 0}, "timeout_s", ">= 1"),
        ("spawn-task", {"prompt": "x", "timeout_s": 86_401}, "timeout_s", "<= 86400"),
        ("spawn-task", {"prompt": "x", "labels": [f"l{i}" for i in range(17)]}, "labels", "at most 16"),
        ("spawn-task", {"prompt": "x", "worker": "nobody"}, "worker", "known workers: claude, codex, fake, missing"),
        ("spawn-task", {"prompt": "x", "cwd": "/etc"}, "cwd", "outside the allowed roots"),
        ("spawn-task", {"prompt": "x", "cwd": "relative/dir"}, "cwd", "absolute"),
        ("spawn-task", {"prompt": "x", "timeuot_s": 5}, "timeuot_s", "not an argument"),
        ("get-task", {"task_id": "tsk_nope"}, "task_id", "no task 'tsk_nope'"),
        ("get-task", {"task_id": "tsk_x", "tail_lines": 501}, "tail_lines", "<= 500"),
        ("get-task", {"task_id": "job_1"}, "task_id", "must match"),
        ("wait-task", {"task_ids": []}, "task_ids", "at least 1"),
        ("wait-task", {"task_ids": [f"tsk_{i}" for i in range(51)]}, "task_ids", "at most 50"),
        ("wait-task", {"task_ids": ["tsk_nope"]}, "task_ids", "no task 'tsk_nope'"),
        ("wait-task", {"task_ids": "tsk_x", "timeout_s": 51}, "timeout_s", "<= 50"),
        ("wait-task", {"task_ids": 7}, "task_ids", "type"),
        ("message-task", {"task_id": "tsk_nope", "message": "hi"}, "task_id", "no task 'tsk_nope'"),
        ("message-task", {"task_id": "tsk_x", "message": ""}, "message", "at least 1"),
        ("cancel-task", {"task_id": []}, "task_id", "at least 1"),
        ("cancel-task", {"task_id": [f"tsk_{i}" for i in range(101)]}, "task_id", "at most 100"),
        ("list-tasks", {"limit": 0}, "limit", ">= 1"),
        ("list-tasks", {"limit": 201}, "limit", "<= 200"),
        ("list-tasks", {"cursor": "bogus"}, "cursor", "not a cursor"),
        ("list-tasks", {"cursor": "bogus!"}, "cursor", "must match"),
        ("list-tasks", {"cursor": "c" * 201}, "cursor", "at most 200"),
        # A well-formed cursor whose number no SQLite integer holds.
        ("list-tasks", {"cursor": "c2VxOjk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5"}, "cursor", "not a cursor"),
        ("spawn-task", {"prompt": "x", "cwd": "/tmp/a\x00b"}, "cwd", "NUL"),
        ("spawn-task", {"prompt": "echo a\x00b", "worker": "shell"}, "prompt", "NUL"),
        ("list-tasks", {"status": "sleeping"}, "status", "one of"),
    ],
)
async def test_bad_input_gets_an_error_naming_the_field_and_the_bound(
    ws: Workspace, tool: str, args: dict, field: str, bound: str
) -> None:
    async with stdio_client(ws) as client:
        result = await call_error(client, tool, args)
        data = result.structured_content
        assert data["error"] == "invalid_arguments"
        assert data["tool"] == tool
        assert data["field"] == field, data
        text = text_of(result)
        assert text.startswith(f"invalid_arguments: {field}")
        assert bound in text, text
        # Nothing was written and the server still answers.
        assert (await call(client, "list-tasks", {}))["tasks"] == []


async def test_paths_and_prompts_the_os_cannot_take_are_refused_at_the_call(ws: Workspace) -> None:
    """Nothing reaches "Error executing tool" or a turn that fails with "internal error"."""
    loop = ws.work / "loop"
    loop.symlink_to(loop)
    async with stdio_client(ws) as client:
        result = await call_error(client, "spawn-task", {"prompt": "x", "cwd": str(loop)})
        assert result.structured_content["field"] == "cwd"
        assert text_of(result).startswith(f"invalid_arguments: cwd: {loop} cannot be resolved"), text_of(result)

        # A shell session, then a next turn whose script holds a NUL byte.
        task = await spawn_and_wait(client, "echo first", worker="shell", cwd=str(ws.work))
        assert task["status"] == "completed", task
        result = await call_error(client, "message-task", {"task_id": task["task_id"], "message": "echo \x00"})
        assert result.structured_content["field"] == "message"
        assert "NUL byte" in text_of(result)
        tasks = (await call(client, "list-tasks", {}))["tasks"]
        assert [t["status"] for t in tasks] == ["completed"]


async def test_idempotency_key_returns_the_same_task(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        a = await call(client, "spawn-task", {"prompt": "say once", "idempotency_key": "build-42"})
        b = await call(client, "spawn-task", {"prompt": "say once", "idempotency_key": "build-42"})
        assert a["task_id"] == b["task_id"]
        assert len((await call(client, "list-tasks", {}))["tasks"]) == 1


async def test_list_tasks_filters_and_pages_newest_first(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        ids = []
        for i in range(5):
            t = await call(client, "spawn-task", {"prompt": f"say {i}", "labels": ["even" if i % 2 == 0 else "odd"]})
            ids.append(t["task_id"])
        await call(client, "wait-task", {"task_ids": ids, "mode": "all"})
        page1 = await call(client, "list-tasks", {"limit": 2})
        assert [t["task_id"] for t in page1["tasks"]] == ids[::-1][:2]
        page2 = await call(client, "list-tasks", {"limit": 2, "cursor": page1["next_cursor"]})
        page3 = await call(client, "list-tasks", {"limit": 2, "cursor": page2["next_cursor"]})
        assert [t["task_id"] for t in page2["tasks"] + page3["tasks"]] == ids[::-1][2:]
        assert page3["next_cursor"] is None
        evens = await call(client, "list-tasks", {"label": "even"})
        assert [t["task_id"] for t in evens["tasks"]] == [ids[4], ids[2], ids[0]]
        completed = await call(client, "list-tasks", {"status": "completed", "worker": "fake"})
        assert len(completed["tasks"]) == 5


async def test_wait_task_sends_progress_with_the_latest_activity(ws: Workspace) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with stdio_client(ws) as client:
        task = await call(client, "spawn-task", {"prompt": "say compiling module A\nsleep 9\nsay done"})
        result = await client.call_tool(
            "wait-task", {"task_ids": task["task_id"], "timeout_s": 30}, progress_callback=on_progress
        )
        assert result.structured_content["tasks"][0]["status"] == "completed"
    assert seen, "no progress notification arrived during a 9 s wait"
    assert any(m and "compiling module A" in m for _, _, m in seen), seen
    assert all(total == 30 for _, total, _ in seen)


async def test_wait_any_returns_when_the_first_settles_and_reports_the_rest(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        slow = await call(client, "spawn-task", {"prompt": "sleep 20"})
        fast = await call(client, "spawn-task", {"prompt": "say quick"})
        result = await call(client, "wait-task", {"task_ids": [slow["task_id"], fast["task_id"]], "mode": "any"})
        assert result["timed_out"] is False
        assert result["still_waiting"] == [slow["task_id"]]
        timed = await call(client, "wait-task", {"task_ids": [slow["task_id"]], "timeout_s": 0.3})
        assert timed["timed_out"] is True
        assert timed["still_waiting"] == [slow["task_id"]]
        await call(client, "cancel-task", {"task_id": slow["task_id"]})


async def test_resources_serve_the_task_and_its_whole_log(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        task = await spawn_and_wait(client, "stderr a warning on stderr\nsay the end")
        log = await client.read_resource(f"task://{task['task_id']}/log")
        text = log.contents[0].text
        assert '"thread.started"' in text
        assert "a warning on stderr" in text
        detail = await client.read_resource(f"task://{task['task_id']}")
        assert json.loads(detail.contents[0].text)["status"] == "completed"
        templates = await client.list_resource_templates()
        assert {t.uri_template for t in templates.resource_templates} >= {
            "task://{task_id}", "task://{task_id}/log{?offset,limit}"
        }
        assert log.contents[0].meta["taskwarden/log"]["next_offset"] == len(text.encode())
        assert log.contents[0].meta["taskwarden/log"]["eof"] is True


async def test_tools_have_descriptions_schemas_with_bounds_and_annotations(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "spawn-task", "wait-task", "message-task", "cancel-task", "list-tasks", "get-task",
        "send-task-message", "list-task-messages", "review-task",
    }
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40
        assert tool.output_schema is not None
        assert tool.annotations is not None
    prompt = tools["spawn-task"].input_schema["properties"]["prompt"]
    assert (prompt["minLength"], prompt["maxLength"]) == (1, 100_000)
    assert tools["wait-task"].annotations.read_only_hint is True
    assert tools["cancel-task"].annotations.destructive_hint is True
    assert tools["spawn-task"].annotations.read_only_hint is False


async def test_legacy_handshake_clients_get_the_same_tools(ws: Workspace) -> None:
    async with stdio_client(ws, mode="legacy") as client:
        assert client.protocol_version.startswith("2025")
        task = await spawn_and_wait(client, "say over the handshake protocol")
        assert task["output"]["final"] == "over the handshake protocol"


def test_cli_lists_and_shows_tasks(ws: Workspace) -> None:
    async def make() -> str:
        async with stdio_client(ws) as client:
            return (await spawn_and_wait(client, "say from the cli test"))["task_id"]

    task_id = anyio.run(make)
    listing = ws.cli("tasks", "list")
    assert task_id in listing.stdout and "completed" in listing.stdout
    shown = ws.cli("tasks", "show", task_id)
    assert "from the cli test" in shown.stdout
    data = json.loads(ws.cli("tasks", "show", task_id, "--json").stdout)
    assert data["output"]["final"] == "from the cli test"
    missing = ws.cli("tasks", "show", "tsk_nope", check=False)
    assert missing.returncode == 1 and "no task 'tsk_nope'" in missing.stderr


def test_every_command_has_help() -> None:
    import subprocess
    import sys

    for args in (["--help"], ["serve", "--help"], ["tasks", "list", "--help"], ["approvals", "deny", "--help"]):
        out = subprocess.run([sys.executable, "-m", "worker_server", *args], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: taskwarden" in out.stdout


def test_serve_writes_only_mcp_to_stdout(ws: Workspace) -> None:
    import subprocess
    import sys

    init = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    # The forwarder relays the daemon's answers; --in-process serves them itself.
    for extra in ([], ["--in-process"]):
        proc = subprocess.run(
            [sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config), *extra],
            input=json.dumps(init) + "\n", capture_output=True, text=True, timeout=30, env=ws.server_env(),
        )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        assert lines, proc.stderr
        for line in lines:
            assert json.loads(line)["jsonrpc"] == "2.0"
    assert "serving MCP on stdio" in proc.stderr
    assert "daemon (pid" in (ws.root / "logs" / "daemon.log").read_text()
    assert os.path.exists(ws.db)
    assert psutil is not None


async def test_stopping_an_in_process_server_fails_running_turns_as_interrupted(ws: Workspace) -> None:
    # (With the daemon, the default, turns outlive the client: see test_daemon.py.)
    worker_file = ws.work / "worker.pid"
    async with stdio_client(ws, "--in-process") as client:
        task = await call(client, "spawn-task", {"prompt": f"pid {worker_file}\nsleep 300"})
        await wait_until(lambda: worker_file.exists() and worker_file.read_text())
        worker = host_pid(task["task_id"], int(worker_file.read_text()))
    # Closing stdin ends the server; it stops its workers on the way out.
    assert not pid_alive(worker)
    async with stdio_client(ws) as client:
        after = await call(client, "get-task", {"task_id": task["task_id"]})
        assert after["status"] == "failed"
        assert after["status_message"] == "interrupted: server stopped"


async def test_progress_keeps_coming_while_other_writes_wake_the_waiter(ws: Workspace) -> None:
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message)

    async with stdio_client(ws) as client:
        slow = await call(client, "spawn-task", {"prompt": "say slow and steady\nsleep 10\nsay done"})

        async def chatter() -> None:
            # Unrelated writes, more often than progress is due.
            for i in range(8):
                await call(client, "spawn-task", {"prompt": f"say noise {i}"})
                await anyio.sleep(1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(chatter)
            result = await client.call_tool(
                "wait-task", {"task_ids": slow["task_id"], "timeout_s": 30}, progress_callback=on_progress
            )
    assert result.structured_content["tasks"][0]["status"] == "completed"
    assert len(seen) >= 2, seen
    assert any(m and "slow and steady" in m for m in seen)


async def test_waiting_on_many_tasks_keeps_the_result_small(ws: Workspace) -> None:
    long_line = "word " * 2000
    async with stdio_client(ws) as client:
        ids = [(await call(client, "spawn-task", {"prompt": f"say {i} {long_line}"}))["task_id"] for i in range(20)]
        result = await client.call_tool("wait-task", {"task_ids": ids, "mode": "all", "timeout_s": 50})
    tasks = result.structured_content["tasks"]
    assert [t["status"] for t in tasks] == ["completed"] * 20, [t.get("status_message") for t in tasks]
    assert all(t["output"]["truncated"] for t in tasks)
    assert len(text_of(result).encode()) < 48 * 1024


async def test_cancel_kills_a_grandchild_with_a_clean_environment(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        bare_file = ws.work / "bare.pid"
        running = await call(client, "spawn-task", {"prompt": f"bare-child {bare_file}\nsleep 120"})
        await wait_until(lambda: bare_file.exists() and bare_file.read_text())
        bare = host_pid(running["task_id"], int(bare_file.read_text()))
        assert (await call(client, "cancel-task", {"task_id": running["task_id"]}))["cancelled"]
        assert not pid_alive(bare)


async def test_a_finished_turn_leaves_nothing_running(ws: Workspace) -> None:
    escapee_file, bare_file, go = ws.work / "escapee.pid", ws.work / "bare.pid", ws.work / "go"
    async with stdio_client(ws) as client:
        task = await call(
            client, "spawn-task", {"prompt": f"escapee {escapee_file}\nbare-child {bare_file}\nwait-for {go}\nsay finished"}
        )
        await wait_until(lambda: bare_file.exists() and bare_file.read_text())
        left = [host_pid(task["task_id"], int(f.read_text())) for f in (escapee_file, bare_file)]
        assert all(pid_alive(pid) for pid in left)
        go.touch()
        done = (await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": 30}))["tasks"][0]
        assert done["status"] == "completed"
        # The clean-up runs just after the result is recorded (off the wake path).
        await wait_until(lambda: not any(pid_alive(pid) for pid in left), timeout=20)


async def test_a_server_takes_over_from_a_sibling_that_died(tmp_path: Path) -> None:
    # Two in-process stdio servers on one database (two daemons of one
    # PostgreSQL database are the same case): one dies, the other takes over.
    ws = Workspace(tmp_path, max_concurrent=1)
    ws.config.write_text(ws.config.read_text().replace('identity = "tester"', 'identity = "tester"\nreconcile_s = 0.5'))
    worker_file = ws.work / "worker.pid"
    async with stdio_client(ws, "--in-process") as first, stdio_client(ws, "--in-process") as second:
        stuck = await call(first, "spawn-task", {"prompt": f"pid {worker_file}\nsleep 300"})
        await wait_until(lambda: worker_file.exists() and worker_file.read_text())
        worker = host_pid(stuck["task_id"], int(worker_file.read_text()))
        waiting = await call(second, "spawn-task", {"prompt": "say my turn"})
        assert waiting["status"] == "queued"
        servers = [p for p in psutil.Process().children(recursive=True) if "serve" in p.cmdline()]
        owner = next(p for p in servers if p in psutil.Process(worker).parents())
        owner.kill()
        done = (await call(second, "wait-task", {"task_ids": waiting["task_id"], "timeout_s": 30}))["tasks"][0]
        assert done["status"] == "completed"
        gone = await call(second, "get-task", {"task_id": stuck["task_id"]})
        assert gone["status"] == "failed" and gone["status_message"] == "interrupted: server restarted"
        assert not pid_alive(worker)
