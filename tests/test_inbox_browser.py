"""The inbox in a real browser (Debian's Chromium through Playwright), with a real agent.

The agent is an MCP client over streamable HTTP against ``taskwarden serve
--http``; the person signs in with the link ``taskwarden humans add`` prints
and works in the pages as anyone would: clicking, typing, reading.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.inbox_support import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, add_human
from tests.support import FIXTURES, StrictClient, Workspace, call, call_error, http_server

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

APPROVALS_FAST = FIXTURES / "policies" / "approvals-fast.yaml"

# The machine is shared and noisy: give live updates time to arrive. (A
# wait, not a speed claim: the benchmarks measure how fast they are.)
expect.set_options(timeout=20_000)
VIEWPORT = {"width": 1200, "height": 820}


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class Watcher:
    """Records what a page must never do: open dialogs, violate the CSP."""

    def __init__(self, page: Page) -> None:
        self.dialogs: list[str] = []
        self.csp: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", self._console)

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.csp.append(message.text)


async def sign_in(page: Page, link: str) -> None:
    await page.goto(link)
    await page.get_by_role("button", name=re.compile(r"^Sign in as ")).click()
    await expect(page.locator("header .who")).to_contain_text("Signed in as")


async def human_task(agent: Client, prompt: str, **args: Any) -> dict[str, Any]:
    return await call(agent, "spawn-task", {"prompt": prompt, "worker": "human", **args})


async def wait_task(agent: Client, task_id: str) -> dict[str, Any]:
    result = await call(agent, "wait-task", {"task_ids": task_id, "timeout_s": 20})
    assert result["timed_out"] is False, result
    return result["tasks"][0]


async def test_a_person_and_an_agent_work_a_task_together_live(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    async with http_server(ws, "--allow-anonymous") as base, StrictClient(f"{base}/mcp") as agent, chromium() as browser:
        await human_task(agent, "Have a look at the staging dashboard and note anything red.",
                         title="Check the staging dashboard")  # fmt: skip
        await human_task(agent, "Proof-read the onboarding email (attached in the wiki).",
                         title="Proof-read the onboarding email", labels=["docs"])  # fmt: skip
        brief = (
            "We need a **launch date** for v2.\n\n"
            "- check the team calendar\n- avoid Fridays\n\n"
            "Background: [release notes](https://example.com/notes)"
        )
        task = await human_task(agent, brief, title="Pick the launch date", timeout_s=7200)
        tid = task["task_id"]

        page = await browser.new_page(viewport=VIEWPORT)
        watcher = Watcher(page)
        await sign_in(page, add_human(ws, "alice", base))
        await expect(page.locator('[data-count="open"]')).to_have_text("3")
        await page.get_by_role("link", name=re.compile("^Open")).click()
        await page.get_by_role("link", name=re.compile("Pick the launch date")).click()

        await expect(page.locator("h1")).to_have_text("Pick the launch date")
        await expect(page.locator(".brief strong")).to_have_text("launch date")
        link = page.locator('.brief a[href="https://example.com/notes"]')
        await expect(link).to_have_attribute("rel", "noopener noreferrer")
        await expect(page.locator(".facts")).to_contain_text("Deadline")
        await page.get_by_role("button", name="Claim this task").click()
        await expect(page.locator("#task-status")).to_have_text("working")

        # The person asks; the agent's wait-task returns the question.
        await page.locator("#ask-text").fill("Is the 14th too early for marketing?")
        await page.get_by_role("button", name="Ask", exact=True).click()
        await expect(page.locator("#task-status")).to_have_text("input required")
        asked = await wait_task(agent, tid)
        assert asked["status"] == "input_required"
        assert asked["pending"]["kind"] == "question"
        assert asked["pending"]["text"] == "Is the 14th too early for marketing?"

        # The agent answers; the page shows it without a reload.
        await page.evaluate("window.notReloaded = true")
        await page.locator("#reply-text").fill("a draft the live update must keep")
        await call(agent, "send-task-message", {"task_id": tid, "body": "No: the **14th** works for marketing."})
        await expect(page.locator("#thread")).to_contain_text("the 14th works for marketing")
        await expect(page.locator("#thread .author-agent strong")).to_have_text("14th")
        await expect(page.locator("#task-status")).to_have_text("working")
        await expect(page.locator("#live-status")).to_be_visible()
        assert await page.evaluate("window.notReloaded") is True
        await expect(page.locator("#reply-text")).to_have_value("a draft the live update must keep")
        await page.locator("#reply-text").fill("")

        # The inbox lists it under "needs reply".
        await page.get_by_role("navigation", name="Pages").get_by_role("link", name="Inbox").click()
        await expect(page.locator('[data-count="needs_reply"]')).to_have_text("1")
        await expect(page.locator("#items")).to_contain_text("the agent replied")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOTS / "inbox.png"))
        await page.get_by_role("link", name=re.compile("Pick the launch date")).click()

        # Hand in; the agent asks for changes; hand in again; the agent accepts.
        await page.locator("#handin-text").fill("Launch on **Tuesday the 14th**.")
        await page.get_by_role("button", name="Hand in").click()
        await expect(page.locator("#task-status")).to_have_text("input required")
        review = await wait_task(agent, tid)
        assert review["pending"]["kind"] == "review"
        assert review["pending"]["text"] == "Launch on **Tuesday the 14th**."

        await page.evaluate("window.notReloaded = true")
        await call(agent, "review-task",
                   {"task_id": tid, "decision": "request_changes", "feedback": "Add the time for the US team."})  # fmt: skip
        await expect(page.locator("#thread")).to_contain_text("Add the time for the US team.")
        await expect(page.locator("#task-status")).to_have_text("working")
        await expect(page.locator("#handin-text")).to_be_visible()
        assert await page.evaluate("window.notReloaded") is True
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOTS / "task.png"), full_page=True)

        final_text = "Launch on **Tuesday the 14th**, 16:00 UTC (9:00 in San Francisco)."
        await page.locator("#handin-text").fill(final_text)
        await page.get_by_role("button", name="Hand in").click()
        second = await wait_task(agent, tid)
        assert second["pending"]["text"] == final_text
        await page.evaluate("window.notReloaded = true")
        done = await call(agent, "review-task", {"task_id": tid, "decision": "accept", "feedback": "Thanks!"})
        assert done["status"] == "completed"
        assert done["output"]["final"] == final_text
        await expect(page.locator("#task-status")).to_have_text("completed")
        await expect(page.locator(".banner")).to_contain_text("The agent accepted the result")
        assert await page.evaluate("window.notReloaded") is True
        assert await page.locator("#handin-text").count() == 0

        # What the person wrote reached the agent as a person's messages.
        thread = (await call(agent, "list-task-messages", {"task_id": tid}))["messages"]
        mine = [m for m in thread if m["author"] == "human"]
        assert [m["kind"] for m in mine] == ["question", "handin", "handin"]
        assert {m["author_name"] for m in mine} == {"alice"}
        assert watcher.dialogs == [] and watcher.csp == []


async def test_a_person_approves_one_held_call_and_denies_another(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=APPROVALS_FAST)
    async with http_server(ws, "--allow-anonymous") as base, StrictClient(f"{base}/mcp") as agent, chromium() as browser:
        tools = {t.name for t in (await agent.list_tools()).tools}
        assert not any("approv" in name for name in tools), "no MCP tool may decide an approval"
        first = await human_task(agent, "Old duplicate", title="Duplicate request")
        second = await human_task(agent, "Still wanted", title="Customer request")
        first_args = {"task_id": first["task_id"], "reason": "duplicate"}
        held = await call_error(agent, "cancel-task", first_args)
        assert held.structured_content["error"] == "approval_required"
        approval_id = held.structured_content["approval"]["id"]

        page = await browser.new_page(viewport=VIEWPORT)
        watcher = Watcher(page)
        await sign_in(page, add_human(ws, "alice", base))
        await expect(page.locator('[data-count="approvals"]')).to_have_text("1")
        await page.get_by_role("link", name=re.compile("^Approvals")).first.click()
        await page.get_by_role("link", name=re.compile("cancel-task")).click()
        await expect(page.locator("h1")).to_contain_text("cancel-task")
        await expect(page.locator("#approval-args")).to_contain_text(f'"task_id": "{first["task_id"]}"')
        await expect(page.locator("#approval-args")).to_contain_text('"reason": "duplicate"')
        await expect(page.locator(".facts")).to_contain_text("Cancelling work needs a human's approval")
        await expect(page.locator(".facts")).to_contain_text("anonymous")
        await page.get_by_role("button", name="Approve").click()
        await expect(page.locator("#approval-status")).to_have_text("approved")
        await expect(page.locator(".banner")).to_contain_text("Approved by alice")

        ran = await call(agent, "cancel-task", first_args)
        assert ran["cancelled"] == [first["task_id"]]

        # The approvals tab fills in live when the agent's next call is held.
        await page.goto(f"{base}/inbox/?tab=approvals")
        await expect(page.locator('[data-count="approvals"]')).to_have_text("0")
        second_args = {"task_id": second["task_id"], "reason": "not needed"}
        held = await call_error(agent, "cancel-task", second_args)
        await expect(page.locator('[data-count="approvals"]')).to_have_text("1")
        await page.get_by_role("link", name=re.compile("cancel-task")).click()

        # No reason, no denial: the server refuses it and says why.
        await page.locator("#deny-reason").fill("   ")
        await page.get_by_role("button", name="Deny").click()
        await expect(page.locator(".error")).to_have_text("A reason is required to deny: the agent is shown it.")
        await expect(page.locator("#approval-status")).to_have_text("pending")
        await page.locator("#deny-reason").fill("The customer still needs it.")
        await page.get_by_role("button", name="Deny").click()
        await expect(page.locator("#approval-status")).to_have_text("denied")
        await expect(page.locator(".banner")).to_contain_text("Denied by alice")
        await expect(page.locator(".banner")).to_contain_text("The customer still needs it.")

        answer = await call_error(agent, "cancel-task", second_args)
        assert answer.structured_content["error"] == "approval_denied"
        assert answer.structured_content["reason"] == "The customer still needs it."
        assert (await call(agent, "get-task", {"task_id": second["task_id"]}))["status"] == "queued"

        # The audit trail shows both, filterable.
        await page.goto(f"{base}/inbox/audit")
        await page.locator('select[name="decision"]').select_option("approval_denied")
        await page.get_by_role("button", name="Filter").click()
        rows = page.locator("table.audit tbody tr")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("The customer still needs it.")
        await page.goto(f"{base}/inbox/audit?tool=cancel-task&decision=allow&identity=anonymous&since=1h")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text(approval_id)
        assert watcher.dialogs == [] and watcher.csp == []


PAYLOADS = [
    "<img src=x onerror=\"document.title='pwned'\">",
    "<svg onload=\"document.title='pwned'\">",
    "<a href=\"javascript:document.title='pwned'\">click me</a>",
    "<iframe src=\"javascript:alert(1)\"></iframe>",
    "\"><script>document.title='pwned'</script>",
    "\" onmouseover=\"document.title='pwned'",
    "<body onload=\"alert(1)\">",
    "<math><mtext><table><mglyph><style><img src=x onerror=\"document.title='pwned'\">",
    "<a href=\"jAvAsCrIpT:alert(1)\">mixed case</a>",
    "<a href=\"&#106;avascript:alert(1)\">entity</a>",
    "<a href=\"java&#x0A;script:alert(1)\">newline</a>",
    "<a href=\" javascript:alert(1)\">leading space</a>",
    "<a href=\"data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==\">data url</a>",
    "<object data=\"javascript:alert(1)\"></object>",
    "<embed src=\"javascript:alert(1)\">",
    "<form action=\"javascript:alert(1)\"><button>submit</button></form>",
    "<meta http-equiv=\"refresh\" content=\"0;url=javascript:alert(1)\">",
    "<style>@import 'https://evil.example/x.css'; body { display: none }</style>",
    "[markdown link](javascript:alert(1))",
    "[mixed](JaVaScRiPt:document.title='pwned')",
    "<details open ontoggle=\"document.title='pwned'\">toggle</details>",
    "<video><source onerror=\"document.title='pwned'\"></video>",
    "<input autofocus onfocus=\"document.title='pwned'\">",
    "<select autofocus onfocus=alert(1)></select>",
    "<svg><script>alert(1)</script></svg>",
    "<noscript><p title=\"</noscript><img src=x onerror=alert(1)>\">",
    "<div style=\"background:url(javascript:alert(1))\">styled</div>",
    "<base href=\"javascript:alert(1)//\">",
    "<svg><animate onbegin=alert(1) attributeName=x dur=1s></svg>",
    "<a href=\"vbscript:msgbox(1)\">vbscript</a>",
]
DANGEROUS_TAGS = (
    "script, iframe, object, embed, img, svg, math, style, meta, base, form, input, video, audio, source, "
    "details, select, textarea, button, noscript, body, link"
)


async def assert_nothing_ran(page: Page, watcher: Watcher, title: str) -> None:
    # Give any handler that could fire (onerror, ontoggle, autofocus…) its chance.
    await page.wait_for_timeout(500)
    assert watcher.dialogs == []
    assert await page.title() == title
    assert await page.locator('a[href^="javascript:" i], a[href^="data:" i], a[href^="vbscript:" i]').count() == 0
    handlers = await page.evaluate(
        """() => [...document.querySelectorAll('*')].flatMap(el => [...el.attributes]
            .filter(a => a.name.toLowerCase().startsWith('on')).map(a => el.tagName + ' ' + a.name))"""
    )
    assert handlers == []
    assert await page.locator(f":is(#thread, .brief, #items) :is({DANGEROUS_TAGS})").count() == 0
    styled = await page.evaluate("() => document.querySelectorAll('[style]').length")
    assert styled == 0
    protocols = await page.evaluate("() => [...document.querySelectorAll('main a[href]')].map(a => a.protocol)")
    assert set(protocols) <= {"http:", "https:", "mailto:"}
    assert watcher.csp == []


async def test_hostile_message_bodies_never_execute(tmp_path: Path) -> None:
    assert len(PAYLOADS) >= 20
    ws = Workspace(tmp_path)
    async with http_server(ws, "--allow-anonymous") as base, StrictClient(f"{base}/mcp") as agent, chromium() as browser:
        hostile_title = "<img src=x onerror=alert(1)> title\"><script>alert(1)</script>"
        await human_task(agent, "\n\n".join(PAYLOADS), title=hostile_title)
        task = await human_task(agent, "Brief:\n\n" + "\n\n".join(PAYLOADS), title="Read these messages")
        tid = task["task_id"]

        page = await browser.new_page(viewport=VIEWPORT)
        watcher = Watcher(page)
        await sign_in(page, add_human(ws, "alice", base))
        await page.goto(f"{base}/inbox/?tab=open")
        await expect(page.locator("#items")).to_contain_text(hostile_title)  # shown as text
        await assert_nothing_ran(page, watcher, "Inbox · taskwarden")

        await page.goto(f"{base}/inbox/tasks/{tid}")
        await page.get_by_role("button", name="Claim this task").click()
        # The agent's messages arrive while the page is open (the live path)…
        for i, payload in enumerate(PAYLOADS):
            await call(agent, "send-task-message", {"task_id": tid, "body": f"agent payload {i}: {payload}"})
        await expect(page.locator("#thread")).to_contain_text(f"agent payload {len(PAYLOADS) - 1}:")
        await assert_nothing_ran(page, watcher, "Read these messages · taskwarden")

        # …and the person replies with the same bodies through the form.
        for i, payload in enumerate(PAYLOADS):
            await page.locator("#reply-text").fill(f"human payload {i}: {payload}")
            await page.get_by_role("button", name="Send reply").click()
            await expect(page.locator("#thread")).to_contain_text(f"human payload {i}:")
        await page.reload()
        await expect(page.locator("#thread .author-human")).to_have_count(len(PAYLOADS))
        await expect(page.locator("#thread")).to_contain_text("\" onmouseover=\"document.title='pwned'")
        await assert_nothing_ran(page, watcher, "Read these messages · taskwarden")

        # The agent gets the person's words back verbatim, marked as a person's.
        thread = (await call(agent, "list-task-messages", {"task_id": tid}))["messages"]
        replies = [m for m in thread if m["author"] == "human"]
        assert [m["body"] for m in replies] == [f"human payload {i}: {p}" for i, p in enumerate(PAYLOADS)]
        assert {m["author_name"] for m in replies} == {"alice"}


async def test_a_newcomer_lands_where_the_work_is_and_reads_denials_and_the_audit_at_a_glance(tmp_path: Path) -> None:
    ws = Workspace(tmp_path, policy=APPROVALS_FAST)
    async with http_server(ws, "--allow-anonymous") as base, StrictClient(f"{base}/mcp") as agent, chromium() as browser:
        task = await human_task(agent, "Check the **release notes**", title="Release notes")
        page = await browser.new_page(viewport=VIEWPORT)
        watcher = Watcher(page)
        await sign_in(page, add_human(ws, "alice", base))
        # Nothing needs a reply yet; the open task is where the work is.
        await page.goto(f"{base}/inbox/")
        await expect(page.locator(".tab.current")).to_contain_text("Open")
        await expect(page.locator("#items")).to_contain_text("Release notes")

        # The task page: hand in, ask and reply each say what they do.
        await page.get_by_role("link", name=re.compile("Release notes")).click()
        await page.get_by_role("button", name="Claim this task").click()
        await expect(page.locator(".handin")).to_contain_text("goes to the agent as the result")
        await expect(page.locator("form:has(#ask-text)")).to_contain_text("The task waits for the agent's answer")
        await expect(page.locator("form:has(#reply-text)")).to_contain_text("nothing waits for it")

        # A denial reads as a refusal, not as a success.
        held = await call_error(agent, "cancel-task", {"task_id": task["task_id"], "reason": "x" * 300})
        approval_id = held.structured_content["approval"]["id"]
        await page.goto(f"{base}/inbox/approvals/{approval_id}")
        await page.locator("#deny-reason").fill("Keep it.")
        await page.get_by_role("button", name="Deny").click()
        banner = page.locator(".banner")
        await expect(banner).to_contain_text("Denied by alice")
        await expect(banner).to_have_class(re.compile(r"\bdenied\b"))
        # The failure colour, not the success green. Retried like the checks above: a
        # live update can replace the page between finding the banner and styling it.
        await expect(banner).to_have_css("background-color", "rgb(251, 224, 222)")

        # The audit trail: one compact line per call, arguments opened on demand.
        for _ in range(6):
            await call(agent, "list-tasks", {"limit": 5})
        await page.goto(f"{base}/inbox/audit")
        rows = page.locator("table.audit tbody tr")
        assert await rows.count() >= 8
        heights = [box["height"] for box in [await rows.nth(i).bounding_box() for i in range(await rows.count())]]
        assert max(heights) < 3 * min(heights), heights  # no row is a wall of JSON
        cancel_row = rows.filter(has_text="cancel-task").first
        details = cancel_row.locator("details")
        assert await details.get_attribute("open") is None
        await expect(cancel_row.locator("pre.args")).to_be_hidden()
        await cancel_row.locator("summary").click()
        await expect(cancel_row.locator("pre.args")).to_be_visible()
        await expect(cancel_row.locator("pre.args")).to_contain_text(f'"task_id": "{task["task_id"]}"')
        # Expanded JSON keeps its lines whole (it scrolls sideways rather than break a word).
        white_space = await cancel_row.locator("pre.args").evaluate("el => getComputedStyle(el).whiteSpace")
        assert white_space == "pre"
        await page.screenshot(path=str(SCREENSHOTS / "audit-compact.png"), full_page=True)
        assert watcher.dialogs == [] and watcher.csp == []
