"""Human workers without a browser: accounts, the inbox over HTTP, the terminal alternative.

The agent is a real MCP client (stdio or streamable HTTP) against a real
server; people act through the inbox (httpx, as a browser without
JavaScript would) or through the ``taskwarden`` command line.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import anyio
import httpx
import pytest

from guard.storage.clock import FakeClock
from guard.storage import open_database
from tests.inbox_support import add_human, csrf_of, inbox_server, post_form, sign_in, signed_in_client
from tests.support import FIXTURES, StrictClient, Workspace, call, call_error, http_server, stdio_client, text_of
from worker_server.inbox.accounts import SIGNIN_TTL_S, Accounts, InvalidName
from worker_server.inbox.rendering import render

pytestmark = pytest.mark.anyio

APPROVALS_FAST = FIXTURES / "policies" / "approvals-fast.yaml"
CSP = "default-src 'self'"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


async def spawn_human(client, prompt: str, **args) -> dict:
    return await call(client, "spawn-task", {"prompt": prompt, "worker": "human", **args})


# -- accounts ------------------------------------------------------------------


async def test_a_sign_in_link_works_once_and_sets_a_strict_httponly_cookie(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        link = add_human(ws, "alice", base)
        token = link.rsplit("/", 1)[1]
        assert ws.cli("humans", "list").stdout.split("\t")[2].strip() == "not signed in"

        async with httpx.AsyncClient(follow_redirects=False) as http:
            page = await http.get(link)
            assert page.status_code == 200
            assert "Sign in as alice" in page.text
            # Looking at the page (as a link previewer would) does not use the link.
            assert "Sign in as alice" in (await http.get(link)).text

            signed = await http.post(link)
            assert signed.status_code == 303
            assert signed.headers["location"] == "/inbox/"
            cookie = signed.headers["set-cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=strict" in cookie
            assert "Path=/inbox" in cookie
            assert "Secure" not in cookie  # plain http on loopback
            inbox = await http.get(f"{base}/inbox/")
            assert inbox.status_code == 200
            assert "Signed in as <strong>alice</strong>" in inbox.text

        async with httpx.AsyncClient(follow_redirects=False) as other:
            again = await other.post(link)
            assert again.status_code == 410
            assert "already used" in again.text
            assert "set-cookie" not in again.headers
            assert (await other.get(f"{base}/inbox/")).status_code == 401

    assert "\tsigned in" in ws.cli("humans", "list").stdout
    # Only digests are stored: the database never holds the token itself.
    with sqlite3.connect(ws.db) as db:
        stored = [r[0] for r in db.execute("SELECT token_sha256 FROM inbox_signin_tokens")]
        sessions = [r[0] for r in db.execute("SELECT id_sha256 FROM inbox_sessions")]
    assert token not in ws.db.read_bytes().decode("latin-1")
    assert len(stored) == 1 and re.fullmatch(r"[0-9a-f]{64}", stored[0])
    assert len(sessions) == 1 and re.fullmatch(r"[0-9a-f]{64}", sessions[0])


async def test_the_cookie_is_secure_when_a_trusted_proxy_says_https(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        link = add_human(ws, "alice", base)
        # uvicorn believes X-Forwarded-Proto only from trusted proxies (default: loopback, as here).
        async with httpx.AsyncClient(follow_redirects=False, headers={"X-Forwarded-Proto": "https"}) as http:
            signed = await sign_in(http, link)
        assert signed.status_code == 303
        assert "Secure" in signed.headers["set-cookie"]


async def test_a_new_link_replaces_the_unused_one_and_remove_signs_out(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        first = add_human(ws, "alice", base)
        second = add_human(ws, "alice", base)
        async with httpx.AsyncClient(base_url=base, follow_redirects=False) as http:
            stale = await http.get(first)
            assert stale.status_code == 404
            assert "not valid" in stale.text
            assert (await sign_in(http, second)).status_code == 303
            assert (await http.get("/inbox/")).status_code == 200

            removed = ws.cli("humans", "remove", "alice")
            assert "Removed alice" in removed.stdout
            gone = await http.get("/inbox/")
            assert gone.status_code == 401
            assert "Sign in to the inbox" in gone.text
    assert "No people yet" in ws.cli("humans", "list").stdout
    missing = ws.cli("humans", "remove", "alice", check=False)
    assert missing.returncode == 1
    assert "no person named 'alice'" in missing.stderr
    bad = ws.cli("humans", "add", "<script>", check=False)
    assert bad.returncode == 2
    assert "NAME" in bad.stderr


async def test_sign_in_refuses_cross_site_posts_and_offers_a_same_site_way_in(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        link = add_human(ws, "alice", base)
        async with httpx.AsyncClient(base_url=base, follow_redirects=False) as http:
            forged = await http.post(link, headers={"Sec-Fetch-Site": "cross-site"})
            assert forged.status_code == 403
            assert "set-cookie" not in forged.headers
            assert (await sign_in(http, link)).status_code == 303  # the link still works
        # Arriving from another site, a SameSite=Strict cookie is not sent: offer a same-site link.
        async with httpx.AsyncClient(base_url=base) as http:
            arriving = await http.get("/inbox/?tab=open", headers={"Sec-Fetch-Site": "cross-site"})
            assert arriving.status_code == 401
            assert "continue to the inbox" in arriving.text


async def test_sign_in_links_expire_after_seven_days(tmp_path: Path) -> None:
    clock = FakeClock()
    db = await open_database(tmp_path / "t.db")
    try:
        accounts = Accounts(db, clock)
        link = await accounts.add("bob", "http://127.0.0.1:1/inbox")
        token = link.rsplit("/", 1)[1]
        clock.advance(SIGNIN_TTL_S + 1)
        state, name = await accounts.link_state(token)
        assert (state.value, name) == ("expired", "bob")
        assert await accounts.sign_in(token) is None
        with pytest.raises(InvalidName):
            await accounts.add("", "http://x/inbox")
    finally:
        await db.close()


# -- what people without a session, a token or a same-site form get -------------


async def test_without_signing_in_no_page_shows_task_data(ws: Workspace) -> None:
    title = "Rotate the staging keys"
    brief = "Secret brief: the vault is in room 42"
    async with http_server(ws, "--allow-anonymous") as base:
        async with httpx.AsyncClient(base_url=base, follow_redirects=False, timeout=10) as http:
            async with StrictClient(f"{base}/mcp") as client:
                task = await spawn_human(client, brief, title=title)
            for path in ("/inbox/", "/inbox/?tab=open", f"/inbox/tasks/{task['task_id']}", "/inbox/events",
                         "/inbox/audit", "/inbox/audit?tool=spawn-task", "/inbox/approvals/apr_whatever"):
                response = await http.get(path)
                assert response.status_code == 401, path
                assert title not in response.text and "room 42" not in response.text, path
                assert task["task_id"] not in response.text, path
                assert CSP in response.headers["content-security-policy"], path
            assert "Sign in to the inbox" in (await http.get("/inbox/")).text
            refused = await http.post(f"/inbox/tasks/{task['task_id']}/claim", data={"csrf": "0" * 64})
            assert refused.status_code == 401
            async with StrictClient(f"{base}/mcp") as client:
                still = await call(client, "get-task", {"task_id": task["task_id"]})
            assert still["status"] == "queued"


async def test_a_form_post_without_its_csrf_token_is_refused(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        async with StrictClient(f"{base}/mcp") as client, signed_in_client(ws, base) as http:
            task = await spawn_human(client, "Label the photos")
            action = f"/inbox/tasks/{task['task_id']}/claim"
            for data in ({}, {"csrf": ""}, {"csrf": "f" * 64}):
                refused = await http.post(action, data=data)
                assert refused.status_code == 403
                assert "security token (CSRF)" in refused.text
                assert CSP in refused.headers["content-security-policy"]
            assert (await call(client, "get-task", {"task_id": task["task_id"]}))["status"] == "queued"

            # Another person's token does not work for this session either.
            async with signed_in_client(ws, base, "bob") as bob:
                bobs = csrf_of((await bob.get("/inbox/")).text)
            assert (await http.post(action, data={"csrf": bobs})).status_code == 403

            claimed = await post_form(http, f"/inbox/tasks/{task['task_id']}", action)
            assert claimed.status_code == 303
            assert (await call(client, "get-task", {"task_id": task["task_id"]}))["status"] == "working"


async def test_every_inbox_response_has_the_csp_and_pages_have_no_inline_code(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        async with StrictClient(f"{base}/mcp") as client, signed_in_client(ws, base) as http:
            task = await spawn_human(client, "Check **this**")
            paths = ["/inbox", "/inbox/", "/inbox/?tab=done", f"/inbox/tasks/{task['task_id']}", "/inbox/audit",
                     "/inbox/audit?since=nonsense", "/inbox/static/inbox.css", "/inbox/static/inbox.js",
                     "/inbox/no-such-page", "/inbox/tasks/tsk_nope", "/inbox/signin/not-a-token"]
            for path in paths:
                response = await http.get(path)
                assert CSP in response.headers.get("content-security-policy", ""), path
                assert response.headers["x-content-type-options"] == "nosniff"
                if response.headers.get("content-type", "").startswith("text/html"):
                    html = response.text
                    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), f"inline script on {path}"
                    assert not re.search(r"\sstyle\s*=", html), f"inline style on {path}"
                    assert not re.search(r"<[^>]+\son[a-z]+\s*=", html), f"inline handler on {path}"
            bad = await http.get("/inbox/audit?since=nonsense")
            assert bad.status_code == 400
            assert "expected an ISO 8601 time" in bad.text


# -- the task flow over HTTP, agent over MCP ---------------------------------------


async def test_a_person_works_a_task_in_the_inbox_without_javascript(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        async with StrictClient(f"{base}/mcp") as client, signed_in_client(ws, base) as http:
            task = await spawn_human(client, "Count the **red** cars", title="Count cars", timeout_s=3600)
            tid = task["task_id"]
            page = f"/inbox/tasks/{tid}"
            opened = await http.get("/inbox/?tab=open")
            assert "Count cars" in opened.text
            assert 'data-count="open">1<' in opened.text

            assert (await post_form(http, page, f"{page}/claim")).status_code == 303
            # An empty question is refused with a message, and nothing changes.
            empty = await post_form(http, page, f"{page}/ask", text="   ")
            assert empty.status_code == 400
            assert "Your question must not be empty" in empty.text
            asked = await post_form(http, page, f"{page}/ask", text="Which street?")
            assert asked.status_code == 303 and asked.headers["location"] == page

            waited = await call(client, "wait-task", {"task_ids": tid, "timeout_s": 10})
            assert waited["tasks"][0]["pending"]["kind"] == "question"
            assert waited["tasks"][0]["pending"]["text"] == "Which street?"
            await call(client, "send-task-message", {"task_id": tid, "body": "Main *Street*"})

            needs = await http.get("/inbox/")
            assert 'data-count="needs_reply">1<' in needs.text
            assert "the agent replied" in needs.text
            shown = await http.get(page)
            assert "Main <em>Street</em>" in shown.text

            await post_form(http, page, f"{page}/handin", text="12 red cars")
            waited = await call(client, "wait-task", {"task_ids": tid, "timeout_s": 10})
            assert waited["tasks"][0]["pending"]["kind"] == "review"
            done = await call(client, "review-task", {"task_id": tid, "decision": "accept"})
            assert done["status"] == "completed"
            assert done["output"]["final"] == "12 red cars"
            final = await http.get(page)
            assert "The agent accepted the result" in final.text
            assert 'action="/inbox/tasks/' not in final.text  # no more actions on a finished task
            assert tid in (await http.get("/inbox/?tab=done")).text


async def test_only_the_person_who_claimed_a_task_can_hand_it_in(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        task = await spawn_human(client, "Review the contract")
        tid = task["task_id"]
        ws.cli("tasks", "claim", tid, "--as", "alice")
        refused = ws.cli("tasks", "handin", tid, "looks fine", "--as", "bob", check=False)
        assert refused.returncode == 1
        assert "claimed by alice, not by bob" in refused.stderr
        assert ws.cli("tasks", "release", tid, "--as", "bob", check=False).returncode == 1
        ws.cli("tasks", "handin", tid, "looks fine", "--as", "alice")
        waited = await call(client, "wait-task", {"task_ids": tid, "timeout_s": 10})
        assert waited["tasks"][0]["pending"] == {
            "kind": "review", "text": "looks fine", "message_id": waited["tasks"][0]["pending"]["message_id"]
        }


async def test_the_inbox_served_alone_works_beside_a_stdio_server(ws: Workspace) -> None:
    async with stdio_client(ws) as client, inbox_server(ws) as base:
        task = await spawn_human(client, "Pick a name for the release", title="Release name")
        tid = task["task_id"]
        async with signed_in_client(ws, base) as http:
            assert "Release name" in (await http.get("/inbox/?tab=open")).text
            page = f"/inbox/tasks/{tid}"
            await post_form(http, page, f"{page}/claim")
            async with anyio.create_task_group() as tg:
                result: dict = {}

                async def agent_waits() -> None:
                    result.update(await call(client, "wait-task", {"task_ids": tid, "timeout_s": 20}))

                tg.start_soon(agent_waits)
                await anyio.sleep(0.3)
                await post_form(http, page, f"{page}/handin", text="Heron")
            assert result["timed_out"] is False
            assert result["tasks"][0]["status"] == "input_required"
            assert result["tasks"][0]["pending"]["text"] == "Heron"


# -- live updates ----------------------------------------------------------------


async def test_the_event_stream_announces_changes_to_signed_in_people_only(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        async with StrictClient(f"{base}/mcp") as client, signed_in_client(ws, base) as http:
            anonymous = await httpx.AsyncClient(base_url=base).get("/inbox/events")
            assert anonymous.status_code == 401
            async with http.stream("GET", "/inbox/events") as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                assert CSP in stream.headers["content-security-policy"]
                lines = stream.aiter_lines()
                assert await _next_event(lines) == "ready"
                await spawn_human(client, "Anything new?")
                with anyio.fail_after(10):
                    assert await _next_event(lines) == "change"


async def _next_event(lines) -> str:
    async for line in lines:
        if line.startswith("event:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("the stream ended")


# -- the terminal alternative and cross-process wake-ups ----------------------------


async def test_the_terminal_alternative_wakes_the_agent_across_processes(ws: Workspace) -> None:
    async with stdio_client(ws) as client:
        task = await spawn_human(client, "Approve the new logo", title="Logo check")
        tid = task["task_id"]
        listed = ws.cli("humans", "inbox").stdout
        assert f"{tid}  open, unclaimed  Logo check" in listed

        assert ws.cli("tasks", "claim", tid, "--as", "bob").stdout.strip() == f"{tid}: working"
        await call(client, "send-task-message", {"task_id": tid, "body": "The blue one, please."})
        assert f"{tid}  agent replied, claimed by bob  Logo check" in ws.cli("humans", "inbox").stdout

        ws.cli("tasks", "reply", tid, "Looking at it now", "--as", "bob")
        messages = (await call(client, "list-task-messages", {"task_id": tid}))["messages"]
        assert messages[-1]["author"] == "human"
        assert messages[-1]["author_name"] == "bob"
        assert messages[-1]["body"] == "Looking at it now"

        result: dict = {}
        async with anyio.create_task_group() as tg:

            async def agent_waits() -> None:
                result.update(await call(client, "wait-task", {"task_ids": tid, "timeout_s": 30}))
                result["returned_at"] = time.monotonic()

            tg.start_soon(agent_waits)
            await anyio.sleep(0.5)
            proc = await anyio.to_thread.run_sync(lambda: ws.cli("tasks", "handin", tid, "Blue logo approved", "--as", "bob"))
            cli_done = time.monotonic()
        assert proc.stdout.strip() == f"{tid}: input_required"
        assert result["timed_out"] is False
        assert result["tasks"][0]["pending"]["kind"] == "review"
        assert result["tasks"][0]["pending"]["text"] == "Blue logo approved"
        # Woken by the CLI process's write: without that wake-up the wait would
        # have run to its 30 s timeout. (How fast it wakes is a benchmark.)
        assert result["returned_at"] - cli_done < 15
        assert "Nothing needs a person right now." in ws.cli("humans", "inbox").stdout

        done = await call(client, "review-task", {"task_id": tid, "decision": "accept"})
        assert done["output"]["final"] == "Blue logo approved"
        assert "completed" in ws.cli("tasks", "show", tid).stdout


async def test_wait_task_wakes_on_a_transition_written_by_another_process(ws: Workspace) -> None:
    from worker_server.config import load_settings
    from worker_server.app import open_app

    async with stdio_client(ws) as client:
        task = await spawn_human(client, "Measure the wake-up")
        tid = task["task_id"]
        settings = load_settings(ws.config)
        # This test process is "another process" to the server: it writes the
        # transitions itself, as the inbox or the CLI would.
        async with open_app(settings, run_workers=False, background=False) as app:
            humans = app.service.humans
            result: dict = {}
            async with anyio.create_task_group() as tg:

                async def agent_waits() -> None:
                    result.update(await call(client, "wait-task", {"task_ids": tid, "timeout_s": 30}))
                    result["returned_at"] = time.monotonic()

                tg.start_soon(agent_waits)
                await anyio.sleep(0.5)
                await humans.claim("carol", tid)  # working: not what wait-task returns for
                await anyio.sleep(0.5)
                assert not result, "wait-task returned for a claim"
                written = time.monotonic()
                await humans.ask("carol", tid, "Which unit?")
        assert result["tasks"][0]["status"] == "input_required"
        assert result["tasks"][0]["pending"]["text"] == "Which unit?"
        # Woken by this process's write, not by its 30 s timeout (the speed is a benchmark).
        assert result["returned_at"] - written < 15


# -- deadlines and cancellation -------------------------------------------------------


async def test_a_human_task_past_its_deadline_expires(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        async with StrictClient(f"{base}/mcp") as client, signed_in_client(ws, base) as http:
            task = await spawn_human(client, "Quick one", timeout_s=1)
            assert task["deadline"] is not None
            waited = await call(client, "wait-task", {"task_ids": task["task_id"], "timeout_s": 20})
            expired = waited["tasks"][0]
            assert waited["timed_out"] is False
            assert expired["status"] == "failed"
            assert expired["status_message"] == "expired"
            page = (await http.get(f"/inbox/tasks/{task['task_id']}")).text
            assert "This task ended without a result: expired" in page
            assert "The deadline passed; the task expired." in page
            assert "Claim this task" not in page


async def test_a_person_sees_that_the_agent_cancelled_their_task(ws: Workspace) -> None:
    async with http_server(ws, "--allow-anonymous") as base:
        async with StrictClient(f"{base}/mcp") as client, signed_in_client(ws, base) as http:
            task = await spawn_human(client, "Translate the menu", title="Menu")
            page = f"/inbox/tasks/{task['task_id']}"
            await post_form(http, page, f"{page}/claim")
            result = await call(client, "cancel-task", {"task_id": task["task_id"], "reason": "the menu changed"})
            assert result["cancelled"] == [task["task_id"]]
            shown = (await http.get(page)).text
            assert "This task was cancelled by the agent" in shown
            assert "The agent cancelled this task: the menu changed" in shown
            assert "Hand in" not in shown
            done_tab = (await http.get("/inbox/?tab=done")).text
            assert "Menu" in done_tab and "cancelled" in done_tab
            late = await post_form(http, "/inbox/", f"{page}/handin", text="Too late")
            assert late.status_code == 409
            assert "is cancelled" in late.text


# -- approvals over HTTP ----------------------------------------------------------------


async def test_approval_pages_show_redacted_arguments_and_demand_a_reason_to_deny(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=APPROVALS_FAST)
    async with http_server(ws, "--allow-anonymous") as base:
        async with StrictClient(f"{base}/mcp") as client, signed_in_client(ws, base) as http:
            task = await spawn_human(client, "Keep me")
            secret = "sk-live-" + "A1b2C3d4" * 5
            args = {"task_id": task["task_id"], "reason": f"<b>cleanup</b> api_key={secret}"}
            held = await call_error(client, "cancel-task", args)
            approval_id = held.structured_content["approval"]["id"]
            assert held.structured_content["error"] == "approval_required"

            page = await http.get(f"/inbox/approvals/{approval_id}")
            assert page.status_code == 200
            assert secret not in page.text
            assert "[REDACTED]" in page.text
            assert "&lt;b&gt;cleanup&lt;/b&gt;" in page.text  # arguments are text, never markup
            assert "Cancelling work needs a human&#39;s approval" in page.text
            assert 'data-count="approvals">1<' in (await http.get("/inbox/")).text

            empty = await post_form(http, f"/inbox/approvals/{approval_id}", f"/inbox/approvals/{approval_id}/deny",
                                    reason="  ")
            assert empty.status_code == 400
            assert "A reason is required to deny" in empty.text
            denied = await post_form(http, f"/inbox/approvals/{approval_id}", f"/inbox/approvals/{approval_id}/deny",
                                     reason="still needed")
            assert denied.status_code == 303
            shown = (await http.get(f"/inbox/approvals/{approval_id}")).text
            assert "Denied by <strong>alice</strong>" in shown
            assert "still needed" in shown
            again = await http.post(f"/inbox/approvals/{approval_id}/approve", data={"csrf": csrf_of(shown)})
            assert again.status_code == 409
            assert "the first answer stands" in again.text

            answer = await call_error(client, "cancel-task", args)
            assert answer.structured_content["error"] == "approval_denied"
            assert answer.structured_content["reason"] == "still needed"
            assert "still needed" in text_of(answer)


# -- rendering --------------------------------------------------------------------------


def test_markdown_and_html_bodies_render_through_the_allow_list() -> None:
    html = render("# Title\n\n**bold** _it_ `code` [site](https://example.com) [mail](mailto:a@b.c)\n\n"
                  "> quote\n\n1. one\n2. two\n\n<p onclick=\"x()\">para <u>u</u></p>")
    assert "<h1>Title</h1>" in html
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html and "<code>code</code>" in html
    assert '<a href="https://example.com" rel="noopener noreferrer">site</a>' in html
    assert 'href="mailto:a@b.c"' in html
    assert "<blockquote>" in html and "<ol>" in html
    assert "onclick" not in html and "<u>" not in html
    for hostile in ("[x](javascript:alert(1))", '<a href="jAvAsCrIpT:alert(1)">x</a>',
                    '<a href="data:text/html,<script>alert(1)</script>">x</a>', "<img src=x onerror=alert(1)>",
                    "[y](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)"):
        out = render(hostile)
        assert not re.search(r"href\s*=\s*[\"']?\s*(javascript|data):", out, re.I), out
        assert "onerror" not in out and "<img" not in out and "<script" not in out, out
