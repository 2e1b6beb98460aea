"""Notifications over real channels on loopback: a webhook receiver, an SMTP server, a killed daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.notify_support import (
    WebhookReceiver,
    eventually,
    notify_workspace,
    start_server,
    webhook_secret,
)
from tests.support import FIXTURES, StrictClient, Workspace, call, call_error, free_port, stop_server, wait_for_port

pytestmark = pytest.mark.anyio

APPROVALS_FAST = FIXTURES / "policies" / "approvals-fast.yaml"


def outbox(ws: Workspace, *flags: str) -> list[dict]:
    return json.loads(ws.cli("notify", "list", "--json", *flags).stdout)


async def test_a_pending_approval_reaches_the_approvers_webhook_signed_and_is_retried_after_a_500(
    tmp_path: Path,
) -> None:
    port = free_port()
    ws = notify_workspace(tmp_path, port, APPROVALS_FAST)
    server = start_server(ws, port, "server.log")
    try:
        await wait_for_port(port, server)
        with WebhookReceiver(statuses=[500]) as hook:
            async with StrictClient(f"http://127.0.0.1:{port}/mcp") as client:
                task = await call(client, "spawn-task", {"prompt": "label photos", "worker": "human"})
                added = ws.cli("humans", "add", "ann", "--role", "approver", "--webhook", hook.url).stdout
                secret = webhook_secret(added)
                ws.cli("humans", "add", "wes", "--role", "worker", "--webhook", hook.url)
                held = await call_error(client, "cancel-task", {"task_id": task["task_id"]})
                approval_id = held.structured_content["approval"]["id"]

                got = (await eventually(lambda: hook.received, what="the webhook"))[0]
                assert len(hook.refused) == 1  # the 500, then the retry
                assert hook.refused[0].headers["x-taskwarden-delivery"] == got.headers["x-taskwarden-delivery"]
                assert got.signed_by(secret)
                assert not got.signed_by("another secret")
                body = got.json
                assert body["event"] == "approval_pending" and body["approval_id"] == approval_id
                assert body["recipient"] == "ann"  # wes is a worker: not told
                assert f"http://127.0.0.1:{port}/inbox/approvals/{approval_id}" in body["text"]
                assert body["decide_link"].startswith(f"http://127.0.0.1:{port}/inbox/decide/")
                assert body["decide_link"] in body["text"]  # Slack shows `text` alone

                sent = [n for n in outbox(ws) if n["event"] == "approval_pending"]
                assert [(n["recipient"], n["status"], n["attempts"]) for n in sent] == [("ann", "sent", 2)]
                assert sent[0]["last_error"] is None  # cleared once it went through
    finally:
        stop_server(server)


async def test_a_daemon_killed_before_delivery_delivers_exactly_once_after_restart(tmp_path: Path) -> None:
    port, hook_port, dead_port = free_port(), free_port(), free_port()
    ws = notify_workspace(tmp_path, port, APPROVALS_FAST, max_attempts=30, retry_base_s=0.2)
    # Nothing listens on the receiver's port yet: every attempt fails until the restart.
    ws.cli("humans", "add", "ann", "--webhook", f"http://127.0.0.1:{hook_port}/hook")
    server = start_server(ws, port, "first.log")
    try:
        await wait_for_port(port, server)
        async with StrictClient(f"http://127.0.0.1:{port}/mcp") as client:
            task = await call(client, "spawn-task", {"prompt": "sort the invoices", "worker": "human",
                                                     "title": "Invoices"})
        queued = await eventually(lambda: [n for n in outbox(ws) if n["attempts"] >= 1], what="a failed attempt")
        assert queued[0]["status"] == "pending" and "ConnectError" in queued[0]["last_error"]
        server.kill()  # kill -9: no goodbye
        server.wait()

        with WebhookReceiver(port=hook_port) as hook:
            server = start_server(ws, port, "second.log")
            await wait_for_port(port, server)
            got = (await eventually(lambda: hook.received, what="the delivery after restart"))[0]
            assert got.json["event"] == "task_posted" and got.json["task_id"] == task["task_id"]
            assert "Invoices" in got.json["text"]
            # Stop and start once more: a sent notification is never sent again.
            stop_server(server)
            server = start_server(ws, port, "third.log")
            await wait_for_port(port, server)
            ws.cli("humans", "add", "zed", "--webhook", f"http://127.0.0.1:{dead_port}/hook")
            async with StrictClient(f"http://127.0.0.1:{port}/mcp") as client:
                await call(client, "spawn-task", {"prompt": "nobody hears this", "worker": "human"})
            # zed's webhook never answers: 30 attempts is too many to wait for, so this
            # only checks it is retried, while ann still has exactly one delivery.
            await eventually(lambda: [n for n in outbox(ws) if n["recipient"] == "zed" and n["attempts"] >= 2],
                             what="zed's retries")  # fmt: skip
            # ann heard of the second task too; of the first, still exactly once.
            await eventually(lambda: len(hook.received) == 2, what="ann's second notification")
            assert [r.json["task_id"] for r in hook.received].count(task["task_id"]) == 1
    finally:
        stop_server(server)


async def test_a_delivery_that_keeps_failing_ends_failed_and_notify_list_shows_it(tmp_path: Path) -> None:
    port, dead_port = free_port(), free_port()
    ws = notify_workspace(tmp_path, port, APPROVALS_FAST, max_attempts=2, retry_base_s=0.1)
    ws.cli("humans", "add", "ann", "--webhook", f"http://127.0.0.1:{dead_port}/hook")
    test = ws.cli("notify", "test", "ann", check=False)
    assert test.returncode == 1 and f"webhook http://127.0.0.1:{dead_port}/hook: failed" in test.stdout
    server = start_server(ws, port, "server.log")
    try:
        await wait_for_port(port, server)
        async with StrictClient(f"http://127.0.0.1:{port}/mcp") as client:
            await call(client, "spawn-task", {"prompt": "p", "worker": "human"})
        failed = await eventually(lambda: outbox(ws, "--failed"), what="a failed notification")
        assert failed[0]["status"] == "failed" and failed[0]["attempts"] == 2
        listed = ws.cli("notify", "list", "--failed").stdout
        assert "failed" in listed and "task_posted" in listed and "ConnectError" in listed
        with WebhookReceiver(port=dead_port) as hook:
            assert ws.cli("notify", "test", "ann").stdout.strip() == f"webhook {hook.url}: sent"
            assert hook.received[0].json["event"] == "test"
    finally:
        stop_server(server)


def events_for(hook: WebhookReceiver, recipient: str) -> list[str]:
    return [r.json["event"] for r in hook.received if r.json["recipient"] == recipient]


async def test_a_claimer_hears_of_answers_requested_changes_a_cancel_and_an_expiry(tmp_path: Path) -> None:
    port = free_port()
    ws = notify_workspace(tmp_path, port, FIXTURES / "policies" / "allow-all.yaml")
    with WebhookReceiver() as hook:
        ws.cli("humans", "add", "bob", "--webhook", hook.url)
        server = start_server(ws, port, "server.log")
        try:
            await wait_for_port(port, server)
            async with StrictClient(f"http://127.0.0.1:{port}/mcp") as agent:
                task = await call(agent, "spawn-task", {"prompt": "Pick a logo", "worker": "human", "title": "Logo"})
                tid = task["task_id"]
                ws.cli("tasks", "claim", tid, "--as", "bob")
                ws.cli("tasks", "ask", tid, "Blue or green?", "--as", "bob")
                await call(agent, "send-task-message", {"task_id": tid, "body": "Blue, please."})
                await eventually(lambda: "question_answered" in events_for(hook, "bob"), what="the answer")
                ws.cli("tasks", "handin", tid, "Green logo attached", "--as", "bob")
                await call(agent, "review-task", {"task_id": tid, "decision": "request_changes",
                                                  "feedback": "I said blue"})
                await eventually(lambda: "changes_requested" in events_for(hook, "bob"), what="the changes")
                await call(agent, "cancel-task", {"task_id": tid, "reason": "we keep the old logo"})
                await eventually(lambda: "claimed_task_ended" in events_for(hook, "bob"), what="the cancel")

                short = await call(agent, "spawn-task", {"prompt": "Quick one", "worker": "human", "timeout_s": 20})
                ws.cli("tasks", "claim", short["task_id"], "--as", "bob")
                await eventually(lambda: events_for(hook, "bob").count("claimed_task_ended") == 2,
                                 timeout=90, what="the expiry")  # fmt: skip
            by_event = {r.json["event"]: r.json for r in hook.received if r.json["task_id"] == tid}
            assert "Blue, please." in by_event["question_answered"]["text"]
            assert "I said blue" in by_event["changes_requested"]["text"]
            assert by_event["claimed_task_ended"]["title"].startswith("A task you claimed was cancelled")
            assert by_event["task_posted"]["link"] == f"http://127.0.0.1:{port}/inbox/tasks/{tid}"
            expired = [r.json for r in hook.received if r.json["task_id"] == short["task_id"]]
            assert "ended (expired)" in expired[-1]["title"]
        finally:
            stop_server(server)


async def test_an_undecided_approval_warns_before_it_expires_and_escalates(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: '1'\ndefault: allow\ntools:\n  cancel-task:\n    rules:\n      - action: require_approval\n"
        "        approval: {expires_s: 30, wait_s: 0, escalate_after_s: 1, escalate_to: [admin]}\n"
    )
    ws = notify_workspace(tmp_path, port, policy, expiring_warn_s=29)
    with WebhookReceiver() as hook:
        ws.cli("humans", "add", "ann", "--role", "approver", "--webhook", hook.url)
        ws.cli("humans", "add", "ada", "--role", "admin", "--webhook", hook.url)
        server = start_server(ws, port, "server.log")
        try:
            await wait_for_port(port, server)
            async with StrictClient(f"http://127.0.0.1:{port}/mcp") as agent:
                task = await call(agent, "spawn-task", {"prompt": "x", "worker": "human"})
                await call_error(agent, "cancel-task", {"task_id": task["task_id"]})
            await eventually(lambda: "approval_escalated" in events_for(hook, "ada"), what="the escalation")
            await eventually(lambda: "approval_expiring" in events_for(hook, "ann"), what="the warning")
            assert "approval_escalated" not in events_for(hook, "ann")
            assert sorted(set(events_for(hook, "ann"))) == ["approval_expiring", "approval_pending", "task_posted"]
            # Each event once per person, however often the daemon looked.
            assert events_for(hook, "ada").count("approval_escalated") == 1
            assert events_for(hook, "ann").count("approval_expiring") == 1
        finally:
            stop_server(server)
