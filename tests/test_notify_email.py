"""E-mail over SMTP with STARTTLS (a real aiosmtpd server), and the one-click link it carries, in Chromium."""

from __future__ import annotations

import re
import ssl
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from playwright.async_api import async_playwright, expect

from guard.storage.clock import SystemClock
from tests.inbox_support import CHROMIUM, CHROMIUM_ARGS
from tests.notify_support import SmtpServer, eventually, notify_workspace, start_server
from tests.support import stop_server
from tests.support import FIXTURES, StrictClient, call, call_error, free_port, wait_for_port
from worker_server.notify.links import LinkSigner

pytestmark = pytest.mark.anyio

APPROVALS_FAST = FIXTURES / "policies" / "approvals-fast.yaml"
HOSTILE = '<script>alert("title")</script><img src=x onerror=alert(1)>'
expect.set_options(timeout=20_000)


def tls_pair(root: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1 (the relay's), and the server context that uses it."""
    cert, key = root / "smtp.pem", root / "smtp.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context


class _Elements(HTMLParser):
    """Every element and attribute a mail client would build from the HTML."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [name for name, _ in attrs]


def html_of(message) -> str:
    return message.get_body(preferencelist=("html",)).get_content()


def text_of(message) -> str:
    return message.get_body(preferencelist=("plain",)).get_content()


async def test_email_over_starttls_and_a_one_click_link_that_decides_once(tmp_path: Path) -> None:
    cert, context = tls_pair(tmp_path)
    port = free_port()
    with SmtpServer(tls_context=context) as smtp:
        ws = notify_workspace(
            tmp_path, port, APPROVALS_FAST, smtp_host="127.0.0.1", smtp_port=smtp.port,
            smtp_security="starttls", smtp_ca_file=str(cert), email_from="taskwarden@example.test",
        )  # fmt: skip
        ws.cli("humans", "add", "ann", "--role", "approver", "--email", "ann@example.test")
        server = start_server(ws, port, "server.log")
        try:
            await wait_for_port(port, server)
            base = f"http://127.0.0.1:{port}"
            async with StrictClient(f"{base}/mcp") as agent:
                task = await call(agent, "spawn-task", {"prompt": "Check **this**" + HOSTILE, "worker": "human",
                                                        "title": "Photos " + HOSTILE})
                posted = (await eventually(lambda: smtp.messages, what="the task e-mail"))[0]
                assert posted["To"] == "ann@example.test" and posted["From"] == "taskwarden@example.test"
                assert posted["Subject"].startswith("New task for people: Photos <script>")  # text, one line
                html = html_of(posted)
                elements = _Elements(html)
                assert "script" not in elements.tags and "img" not in elements.tags
                assert not [a for a in elements.attributes if a.startswith("on")]
                assert "&lt;script&gt;" in html  # the title is shown, as text
                assert "<strong>this</strong>" in html  # the brief is rendered, sanitised
                assert f"{base}/inbox/tasks/{task['task_id']}" in html and f"{base}/inbox/tasks/" in text_of(posted)

                held = await call_error(agent, "cancel-task", {"task_id": task["task_id"], "reason": "not needed"})
                approval_id = held.structured_content["approval"]["id"]
                mail = (await eventually(lambda: smtp.messages[1:], what="the approval e-mail"))[0]
                assert mail["Subject"].startswith("Approval needed: cancel-task")
                links = re.findall(r'href="([^"]+/inbox/decide/[^"]+)"', html_of(mail))
                assert len(links) == 1 and links[0] in text_of(mail)
                link = links[0]

                # A mail scanner fetching the link decides nothing.
                async with httpx.AsyncClient() as scanner:
                    assert (await scanner.get(link)).status_code == 200
                assert (await call_error(agent, "cancel-task", {"task_id": task["task_id"], "reason": "not needed"})
                        ).structured_content["error"] == "approval_required"  # fmt: skip

                async with async_playwright() as p:
                    browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    page = await browser.new_page()
                    await page.goto(link)
                    await expect(page.locator("h1")).to_contain_text("Approve cancel-task?")
                    await expect(page.locator("#decider")).to_have_text("ann")
                    await expect(page.locator("#approval-status")).to_have_text("pending")
                    await page.locator("#approve").click()
                    await expect(page.locator("#decided")).to_contain_text("Approved")
                    done = await call(agent, "cancel-task", {"task_id": task["task_id"], "reason": "not needed"})
                    assert done["cancelled"] == [task["task_id"]]

                    # The same link again, an expired one and a tampered one: each decides nothing.
                    await page.goto(link)
                    await expect(page.locator("#link-problem h1")).to_have_text("This link was already used")
                    second = await call(agent, "spawn-task", {"prompt": "keep", "worker": "human"})
                    held2 = await call_error(agent, "cancel-task", {"task_id": second["task_id"]})
                    other = held2.structured_content["approval"]["id"]
                    signer = LinkSigner.for_file(ws.db)
                    expired = signer.url(f"{base}/inbox", other, "ann", SystemClock().now() - 1)
                    await page.goto(expired)
                    await expect(page.locator("#link-problem h1")).to_have_text("This link has expired")
                    good = signer.url(f"{base}/inbox", other, "ann", time.time() + 600)
                    token = good.rsplit("/", 1)[1]
                    payload, sig = token.split(".")
                    tampered = f"{base}/inbox/decide/{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{sig}"
                    await page.goto(tampered)
                    await expect(page.locator("#link-problem h1")).to_have_text("This link is not valid")
                    # Posting to those addresses decides nothing either.
                    async with httpx.AsyncClient() as http:
                        for bad in (link, expired, tampered):
                            answer = await http.post(bad, data={"decision": "approve"})
                            assert answer.status_code in (400, 410), (bad, answer.status_code)
                    await browser.close()
                pending = await call_error(agent, "cancel-task", {"task_id": second["task_id"]})
                assert pending.structured_content["error"] == "approval_required"
                decisions = ws.cli("approvals", "list", "--json").stdout
                assert '"decided_by": "ann"' in decisions and decisions.count('"decided_by": "ann"') == 1
        finally:
            stop_server(server)
