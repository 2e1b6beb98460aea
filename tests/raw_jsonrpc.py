"""Raw JSON-RPC clients for the MCP Tasks tests: the SDK has no tasks client.

``StdioPeer`` speaks newline-delimited JSON-RPC to a ``taskwarden serve``
process; ``HttpPeer`` posts to ``/mcp`` (2026-07-28: one request per POST
with the SEP-2243 headers; 2025-11-25: a session with ``Mcp-Session-Id``).
Both keep every notification they receive, in order.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx

from tests.support import Workspace

MODERN = "2026-07-28"
LEGACY = "2025-11-25"
TASKS_EXT = "io.modelcontextprotocol/tasks"
CLIENT_INFO = {"name": "raw-jsonrpc-test", "version": "1"}


def envelope(*, tasks: bool = True, elicitation: bool = False) -> dict[str, Any]:
    """The 2026-07-28 per-request ``_meta``: version, client info and capabilities."""
    caps: dict[str, Any] = {}
    if tasks:
        caps["extensions"] = {TASKS_EXT: {}}
    if elicitation:
        caps["elicitation"] = {}
    return {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
        "io.modelcontextprotocol/clientCapabilities": caps,
    }


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = error.get("message", "")
        self.data = error.get("data")


class StdioPeer:
    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        self.ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []
        self._waiting: dict[int, anyio.abc.ObjectSendStream[dict[str, Any]]] = {}
        self._buffer = b""

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for chunk in self.proc.stdout:
            self._buffer += chunk
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                message = json.loads(line)
                if "id" in message and ("result" in message or "error" in message):
                    sender = self._waiting.pop(message["id"], None)
                    if sender is not None:
                        await sender.send(message)
                elif "method" in message and "id" not in message:
                    self.notifications.append(message)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send((json.dumps(message) + "\n").encode())

    async def request(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 60) -> dict[str, Any]:
        """The result of ``method``; ``RpcError`` for a JSON-RPC error."""
        message = await self.exchange(method, params, timeout=timeout)
        if "error" in message:
            raise RpcError(message["error"])
        return message["result"]

    async def exchange(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 60) -> dict[str, Any]:
        request_id = next(self.ids)
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](1)
        self._waiting[request_id] = send
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = params
        await self.send(body)
        with anyio.fail_after(timeout):
            return await receive.receive()

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            body["params"] = params
        await self.send(body)

    async def initialize(self, capabilities: dict[str, Any]) -> dict[str, Any]:
        result = await self.request(
            "initialize", {"protocolVersion": LEGACY, "capabilities": capabilities, "clientInfo": CLIENT_INFO}
        )
        await self.notify("notifications/initialized")
        return result


@asynccontextmanager
async def stdio_peer(ws: Workspace, *extra: str) -> AsyncIterator[StdioPeer]:
    proc = await anyio.open_process(
        [sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config), *extra],
        env=ws.server_env(),
        cwd=ws.work,
        stderr=subprocess.DEVNULL,
    )
    peer = StdioPeer(proc)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(peer._read)
            try:
                yield peer
            finally:
                tg.cancel_scope.cancel()
    finally:
        # End the session as a client does: close the server's stdin.
        if proc.stdin is not None:
            await proc.stdin.aclose()
        with anyio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.terminate()
            with anyio.move_on_after(15):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class HttpPeer:
    """Streamable HTTP, one POST per request; SSE or JSON responses alike."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.ids = itertools.count(1)
        self.session_id: str | None = None
        self.notifications: list[dict[str, Any]] = []

    def _headers(self, method: str, params: dict[str, Any] | None, name: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        meta = (params or {}).get("_meta") or {}
        if "io.modelcontextprotocol/protocolVersion" in meta:
            headers["MCP-Protocol-Version"] = MODERN
            headers["Mcp-Method"] = method
            if name is None:
                name = (params or {}).get("name") or (params or {}).get("taskId")
            if name is not None:
                headers["Mcp-Name"] = name
        elif self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = LEGACY
        return headers

    async def exchange(
        self, method: str, params: dict[str, Any] | None = None, *, name: str | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        request_id = next(self.ids)
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = params
        async with self.client.stream(
            "POST", self.url, json=body, headers=self._headers(method, params, name), timeout=timeout
        ) as response:
            if response.headers.get("mcp-session-id"):
                self.session_id = response.headers["mcp-session-id"]
            kind = response.headers.get("content-type", "")
            if kind.startswith("application/json"):
                return json.loads(await response.aread())
            if not kind.startswith("text/event-stream"):
                raise AssertionError(f"{method}: HTTP {response.status_code} {kind}: {(await response.aread())[:300]!r}")
            async for message in _sse_messages(response):
                if message.get("id") == request_id and ("result" in message or "error" in message):
                    return message
                if "method" in message and "id" not in message:
                    self.notifications.append(message)
        raise AssertionError(f"{method}: the stream ended without a response")

    async def request(self, method: str, params: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        message = await self.exchange(method, params, **kwargs)
        if "error" in message:
            raise RpcError(message["error"])
        return message["result"]

    async def initialize(self, capabilities: dict[str, Any]) -> dict[str, Any]:
        result = await self.request(
            "initialize", {"protocolVersion": LEGACY, "capabilities": capabilities, "clientInfo": CLIENT_INFO}
        )
        headers = self._headers("notifications/initialized", None, None)
        await self.client.post(
            self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
        )
        return result


async def _sse_messages(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            text = "\n".join(data)
            data = []
            if text:
                yield json.loads(text)


@asynccontextmanager
async def http_peer(base_url: str) -> AsyncIterator[HttpPeer]:
    async with httpx.AsyncClient() as client:
        yield HttpPeer(client, f"{base_url}/mcp")
