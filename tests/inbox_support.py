"""Helpers for inbox tests: a standalone inbox process, signing in, forms, Chromium."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.support import Workspace, http_server

# The README's screenshots are refreshed only on request, so a test run never
# leaves tracked files changed: TASKWARDEN_SCREENSHOTS=docs/screenshots pytest …
_ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = _ROOT / os.environ.get("TASKWARDEN_SCREENSHOTS", "test-artifacts/screenshots")
SCREENSHOTS.mkdir(parents=True, exist_ok=True)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def inbox_server(ws: Workspace) -> AbstractAsyncContextManager[str]:
    """Start ``taskwarden inbox --http`` (the inbox alone) and yield its base URL."""
    return http_server(ws, command="inbox")


def add_human(ws: Workspace, name: str, base: str, role: str = "approver", *more: str) -> str:
    """``taskwarden humans add NAME --role ROLE``; returns the sign-in link it printed."""
    out = ws.cli("humans", "add", name, "--url", f"{base}/inbox", "--role", role, *more).stdout
    links = re.findall(r"https?://\S+/inbox/signin/\S+", out)
    assert len(links) == 1, out
    return links[0]


async def sign_in(http: httpx.AsyncClient, link: str) -> httpx.Response:
    """Open the link and press "Sign in" (a POST to the same address)."""
    page = await http.get(link)
    assert page.status_code == 200, page.text
    return await http.post(link)


@asynccontextmanager
async def signed_in_client(
    ws: Workspace, base: str, name: str = "alice", role: str = "approver"
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, follow_redirects=False, timeout=30) as http:
        done = await sign_in(http, add_human(ws, name, base, role))
        assert done.status_code == 303, done.text
        yield http


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


async def post_form(http: httpx.AsyncClient, page_path: str, action: str, **fields: Any) -> httpx.Response:
    """Load ``page_path``, then post to ``action`` with the page's CSRF token, as its form would."""
    page = await http.get(page_path)
    assert page.status_code == 200, page.text
    return await http.post(action, data={"csrf": csrf_of(page.text), **fields})
