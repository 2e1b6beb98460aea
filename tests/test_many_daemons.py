"""Three daemons on one PostgreSQL database, as three hosts would run them.

Each daemon is a real ``taskwarden serve --http`` with its own config and
``state_dir`` (its socket, logs and scratch: what a host keeps to itself) and
the same ``db = "postgresql://…"``. Real MCP clients talk to each over HTTP.
The database is fresh for every test (``pg_url``); where a lost daemon must
be noticed, the lease is short (2 s), so that it is within seconds.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from guard.storage import open_database
from tests.inbox_support import post_form, signed_in_client
from tests.support import (
    StrictClient,
    Workspace,
    call,
    call_error,
    http_server,
    marked_processes,
    server_process,
)

pytestmark = pytest.mark.anyio

# Where a lost daemon must be noticed: short, so it is within seconds; not so short that a loaded
# two-core machine stalls past it (the daemons would rightly take each other for lost).
LEASE_S = 2.0
# Elsewhere, a lease no stall of the machine running the tests outlasts.
CALM_LEASE_S = 15.0
HOST_LOST = "interrupted: host lost"

LIMITED = """\
version: "1"
default: allow
tools:
  spawn-task:
    rules:
      - action: allow
        rate_limit: {max: 30, window: 3600, scope: identity}
"""

CANCEL_NEEDS_APPROVAL = """\
version: "1"
default: allow
tools:
  cancel-task:
    rules:
      - action: require_approval
        reason: "Cancelling work needs a human's approval"
        approval: {expires_s: 900, wait_s: 1}
"""


@dataclass
class PgWorkspace(Workspace):
    """A workspace whose database is a shared PostgreSQL URL; per-host state under ``root/state``."""

    db_url: str = ""
    lease_s: float = CALM_LEASE_S

    def write_config(self) -> None:
        super().write_config()
        text = self.config.read_text()
        text = re.sub(r"^db = .*$", f"db = {json.dumps(self.db_url)}", text, count=1, flags=re.MULTILINE)
        top = textwrap.dedent(
            f"""\
            state_dir = {json.dumps(str(self.root / "state"))}
            lease_s = {self.lease_s}
            reconcile_s = {self.lease_s}
            """
        )
        text = text.replace('identity = "tester"\n', 'identity = "tester"\n' + top, 1)
        self.config.write_text(text)


def workspaces(tmp_path: Path, pg_url: str, policy: str | None = None, **kwargs: Any) -> list[PgWorkspace]:
    found = []
    for name in ("a", "b", "c"):
        root = tmp_path / name
        root.mkdir()
        policy_file = None
        if policy is not None:
            policy_file = root / "policy.yaml"
            policy_file.write_text(policy)
        found.append(PgWorkspace(root, db_url=pg_url, policy=policy_file, **kwargs))
    return found


@asynccontextmanager
async def three_daemons(spaces: Sequence[PgWorkspace]) -> AsyncIterator[list[StrictClient]]:
    """``serve --http`` for each workspace (one after the other: each migrates the shared schema first)
    and an MCP client to each."""
    async with AsyncExitStack() as stack:
        bases = [await stack.enter_async_context(http_server(ws, "--allow-anonymous")) for ws in spaces]
        clients = [await stack.enter_async_context(StrictClient(f"{base}/mcp")) for base in bases]
        yield clients


@asynccontextmanager
async def database(url: str) -> AsyncIterator[Any]:
    db = await open_database(url)
    try:
        yield db
    finally:
        await db.close()


async def statuses(db: Any, task_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    marks = ",".join("?" * len(task_ids))

    def read(tx: Any) -> dict[str, tuple[str, str | None]]:
        rows = tx.execute(f"SELECT id, status, status_message FROM tasks WHERE id IN ({marks})", list(task_ids))
        return {r["id"]: (r["status"], r["status_message"]) for r in rows}

    return await db.read(read)


async def until(check: Any, what: str, timeout: float = 30, interval: float = 0.05) -> Any:
    """Poll ``await check()`` in the test until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (not within {timeout:g} s)")
        await anyio.sleep(interval)


def daemon_status(ws: Workspace) -> dict[str, Any]:
    return json.loads(ws.cli("daemon", "status", "--json").stdout)


async def test_a_limit_of_30_holds_across_three_daemons_and_each_sees_the_others(
    tmp_path: Path, pg_url: str
) -> None:
    spaces = workspaces(tmp_path, pg_url, LIMITED)
    async with three_daemons(spaces) as clients:
        results: list[Any] = [None] * 100

        async def spawn(i: int) -> None:
            results[i] = await clients[i % 3].call_tool("spawn-task", {"prompt": f"say spawned {i}"})

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(spawn, i)
        admitted = [r for r in results if not r.is_error]
        limited = [r for r in results if r.is_error]
        assert len(admitted) == 30, [r.structured_content for r in limited[:3]]
        assert len(limited) == 70
        assert {r.structured_content["error"] for r in limited} == {"rate_limited"}
        assert all(0 < r.structured_content["retry_after_s"] <= 3600 for r in limited)
        # Each daemon admitted some (the calls were spread), and the admitted ones all run to the end.
        ids = [r.structured_content["task_id"] for r in admitted]
        done = await call(clients[1], "wait-task", {"task_ids": ids, "mode": "all", "timeout_s": 50})
        assert not done["timed_out"]
        failed = [(t["task_id"], t["status_message"]) for t in done["tasks"] if t["status"] != "completed"]
        assert not failed, failed
        async with database(pg_url) as db:
            count = await db.read(lambda tx: tx.execute("SELECT count(*) FROM tasks").fetchone()[0])
        assert count == 30

        # (e) Each daemon sees the other two (host, pid, last renewal, lease).
        pids = {server_process(ws).pid for ws in spaces}
        for ws in spaces:
            status = daemon_status(ws)
            assert status["running"]
            others = [d for d in status["daemons"] if not d["this"]]
            assert {d["pid"] for d in others} == pids - {status["pid"]}
            assert all(d["live"] and d["renewed_s_ago"] < CALM_LEASE_S and d["host"] for d in others)
            assert all(d["url"] and d["url"].endswith("/inbox") for d in status["daemons"])
        text = spaces[0].cli("daemon", "status").stdout
        assert "other daemons on this database: 2" in text


async def test_spawned_on_a_waited_on_b_cancelled_on_c_approved_in_as_inbox(tmp_path: Path, pg_url: str) -> None:
    a, b, _ = spaces = workspaces(tmp_path, pg_url, CANCEL_NEEDS_APPROVAL)
    async with AsyncExitStack() as stack:
        bases = [await stack.enter_async_context(http_server(ws, "--allow-anonymous")) for ws in spaces]
        on_a, on_b, on_c = [await stack.enter_async_context(StrictClient(f"{base}/mcp")) for base in bases]
        task = await call(on_a, "spawn-task", {"prompt": "sleep 120"})
        task_id = task["task_id"]
        # B sees it start (A runs it).
        seen = await call(on_b, "wait-task", {"task_ids": task_id, "timeout_s": 1})
        assert seen["tasks"][0]["status"] in ("queued", "working")

        async def started() -> bool:
            return (await call(on_b, "get-task", {"task_id": task_id}))["status"] == "working"

        await until(started, "the task never started", interval=0.1)

        held = await call_error(on_c, "cancel-task", {"task_id": task_id})
        assert held.structured_content["error"] == "approval_required"
        approval_id = held.structured_content["approval"]["id"]

        # B waits while the decision is made in A's inbox.
        waited: dict[str, Any] = {}

        async def wait_on_b() -> None:
            waited.update(await call(on_b, "wait-task", {"task_ids": task_id, "timeout_s": 50}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_on_b)
            async with signed_in_client(a, bases[0], "ann", role="approver") as http:
                decided = await post_form(
                    http, f"/inbox/approvals/{approval_id}", f"/inbox/approvals/{approval_id}/approve"
                )
                assert decided.status_code == 303, decided.text
            # C's held call, asked again, now runs: C asks A (which runs the turn) to stop it.
            done = await call(on_c, "cancel-task", {"task_id": task_id})
            assert done["cancelled"] == [task_id]
        assert not waited["timed_out"]
        assert waited["tasks"][0]["status"] == "cancelled"
        # Used once: the same cancel through B changes nothing and asks nobody (the task has ended),
        # and the approval is spent.
        again = await call(on_b, "cancel-task", {"task_id": task_id})
        assert again["already_terminal"] == [task_id]
        [approval] = [x for x in json.loads(b.cli("approvals", "list", "--json").stdout) if x["id"] == approval_id]
        assert approval["status"] == "approved" and approval["used_at"] is not None
        assert approval["decided_by"] == "ann"
        assert not marked_processes(task_id)


async def test_max_concurrent_2_holds_across_three_daemons(tmp_path: Path, pg_url: str) -> None:
    spaces = workspaces(tmp_path, pg_url, max_concurrent=2)
    async with three_daemons(spaces) as clients, database(pg_url) as db:
        ids = []
        for i in range(12):
            task = await call(clients[i % 3], "spawn-task", {"prompt": f"sleep 0.4\nsay done {i}"})
            ids.append(task["task_id"])
        most = 0
        owners: set[int] = set()
        deadline = time.monotonic() + 60
        while True:

            def sample(tx: Any) -> tuple[int, list[int], int]:
                working = tx.execute(
                    "SELECT owner_pid FROM tasks WHERE status = 'working' AND kind = 'agent'"
                ).fetchall()
                left = tx.execute("SELECT count(*) FROM tasks WHERE status IN ('queued', 'working')").fetchone()[0]
                return len(working), [r[0] for r in working], left

            working, pids, left = await db.read(sample)
            most = max(most, working)
            owners.update(pids)
            assert working <= 2, f"{working} turns working at once, max_concurrent is 2"
            if left == 0:
                break
            assert time.monotonic() < deadline, "the tasks did not finish"
            await anyio.sleep(0.02)
        assert most == 2
        assert len(owners) >= 2, "the turns ran on one daemon only"
        final = await statuses(db, ids)
        assert {s for s, _ in final.values()} == {"completed"}


async def test_a_killed_daemons_running_turns_are_lost_and_its_queue_runs_elsewhere(
    tmp_path: Path, pg_url: str
) -> None:
    a, b, c = spaces = workspaces(tmp_path, pg_url, max_concurrent=2, lease_s=LEASE_S)
    async with three_daemons(spaces) as (on_a, on_b, on_c), database(pg_url) as db:
        long = [(await call(on_a, "spawn-task", {"prompt": "sleep 300"}))["task_id"] for _ in range(2)]

        async def both_working() -> bool:
            return {s for s, _ in (await statuses(db, long)).values()} == {"working"}

        await until(both_working, "A's turns did not start")
        # A's slots are both taken: what is spawned now waits in the queue, A's and the others'.
        queued_on_a = [(await call(on_a, "spawn-task", {"prompt": f"say after {i}"}))["task_id"] for i in range(6)]
        queued_elsewhere = [
            (await call(client, "spawn-task", {"prompt": f"say other {i}"}))["task_id"]
            for i in range(2)
            for client in (on_b, on_c)
        ]
        workers = {t: marked_processes(t) for t in long}
        assert all(workers.values())

        victim = server_process(a)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # Within ~3 leases, its running turns end "interrupted: host lost" ...
        while True:
            now = await statuses(db, long)
            if all(s == "failed" for s, _ in now.values()):
                break
            assert time.monotonic() - killed < 3 * LEASE_S + 5, now
            await anyio.sleep(0.05)
        lost_after = time.monotonic() - killed
        assert {m for _, m in now.values()} == {HOST_LOST}, now
        assert lost_after <= 3 * LEASE_S + 5
        # ... and this host's daemons kill what the lost turns left running.

        async def all_gone() -> bool:
            return not any(marked_processes(t) for t in long)

        await until(all_gone, "the lost turns' processes outlived them", interval=0.1)

        # Its queued turns run on B or C; nothing is lost.
        everything = queued_on_a + queued_elsewhere
        done = await call(on_b, "wait-task", {"task_ids": everything, "mode": "all", "timeout_s": 50})
        assert not done["timed_out"], done
        assert {t["status"] for t in done["tasks"]} == {"completed"}
        final = await statuses(db, long + everything)
        assert len(final) == len(long) + len(everything)
        assert all(s in ("completed", "failed") for s, _ in final.values())

        # B still lists A, its lease lapsed; C live.
        status = daemon_status(b)
        assert [d["pid"] for d in status["daemons"] if not d["live"]] == [victim.pid]
        assert {d["pid"] for d in status["daemons"] if d["live"]} == {status["pid"], server_process(c).pid}


async def test_a_stalled_daemon_is_taken_for_lost_then_finds_its_lease_lapsed_and_registers_again(
    tmp_path: Path, pg_url: str
) -> None:
    a, b, _ = spaces = workspaces(tmp_path, pg_url, lease_s=LEASE_S)
    async with three_daemons(spaces) as (_, on_b, _), database(pg_url) as db:
        task_id = (await call(on_b, "spawn-task", {"prompt": "sleep 300"}))["task_id"]

        async def state() -> tuple[str, str | None]:
            return (await statuses(db, [task_id]))[task_id]

        async def working() -> bool:
            return (await state())[0] == "working"

        async def ended() -> tuple[str, str | None] | None:
            now = await state()
            return now if now[0] != "working" else None

        await until(working, "B's turn did not start")
        assert marked_processes(task_id)
        stalled = server_process(b)
        stalled.send_signal(signal.SIGSTOP)
        try:
            # Its process still exists, but its lease lapses: the others give its turn up.
            assert await until(ended, "B's turn was not given up") == ("failed", HOST_LOST)
            others = daemon_status(a)["daemons"]
            assert [d["live"] for d in others if d["pid"] == stalled.pid] == [False]
        finally:
            stalled.send_signal(signal.SIGCONT)
        # Woken, it finds its own lease lapsed, stops the turn here and registers again.
        log = next(b.root.glob("serve-*.log"))

        async def noticed() -> bool:
            text = log.read_text()
            return "lease lapsed" in text and "registered again" in text

        await until(noticed, "B did not notice its lapsed lease")

        async def gone() -> bool:
            return not marked_processes(task_id)

        await until(gone, "the given-up turn's processes outlived it", interval=0.1)
        seen = {d["pid"]: d["live"] for d in daemon_status(a)["daemons"]}
        assert seen.get(stalled.pid) is True
        # It serves again: a task spawned through it runs.
        task = await call(on_b, "spawn-task", {"prompt": "say back"})
        done = await call(on_b, "wait-task", {"task_ids": task["task_id"], "timeout_s": 30})
        assert done["tasks"][0]["status"] == "completed"
        assert (await statuses(db, [task_id]))[task_id] == ("failed", HOST_LOST)


def test_a_server_database_daemon_never_shows_the_password(tmp_path: Path, pg_url: str) -> None:
    """``serve`` over stdio on a server database starts this host's daemon with the URL
    (the password in its environment, not on its command line); what fails says where, not the password."""
    [a] = workspaces(tmp_path, pg_url)[:1]
    url = pg_url.replace("postgresql:///", "postgresql://nobody:s3cret-pw@localhost/", 1)
    assert "s3cret-pw" in url, "the test server's URL names a host already"
    proc = subprocess.run(
        [sys.executable, "-m", "worker_server", "serve", "--config", str(a.config), "--db", url],
        input="", capture_output=True, text=True, env=a.server_env(), cwd=a.work, timeout=90, check=False,
    )
    assert proc.returncode != 0
    assert "s3cret-pw" not in proc.stderr and "postgresql://nobody@localhost" in proc.stderr, proc.stderr
    logs = list((a.root / "state").rglob("daemon.log"))
    assert logs and all("s3cret-pw" not in p.read_text() for p in logs)
