"""Real receivers on loopback for notification tests: an HTTP webhook receiver and an SMTP server."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
from aiosmtpd.controller import Controller

from tests.support import Workspace, free_port


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def signed_by(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("x-taskwarden-signature", ""))


@dataclass
class WebhookReceiver:
    """A threaded HTTP server that records every POST and answers from ``statuses`` (then 200)."""

    port: int = 0
    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)  # answered 2xx
    refused: list[Received] = field(default_factory=list)  # answered with an error

    def __enter__(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the standard library's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                item = Received({k.lower(): v for k, v in self.headers.items()}, body)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                (receiver.received if status < 300 else receiver.refused).append(item)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's name
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))  # type: ignore[arg-type]
        return "250 OK"


class SmtpServer:
    """aiosmtpd on loopback; ``tls_context`` makes it offer (and require) STARTTLS."""

    def __init__(self, tls_context: Any = None) -> None:
        self.mailbox = _Mailbox()
        self.port = free_port()  # aiosmtpd checks its port by connecting: it cannot take 0
        self._controller = Controller(
            self.mailbox, hostname="127.0.0.1", port=self.port, tls_context=tls_context,
            require_starttls=tls_context is not None,
        )  # fmt: skip

    def __enter__(self) -> SmtpServer:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    @property
    def messages(self) -> list[EmailMessage]:
        return self.mailbox.messages


def notify_workspace(root: Path, port: int, policy: Path, **more: Any) -> Workspace:
    """A workspace whose inbox is at ``port`` (links point there) and whose notifications retry quickly."""
    settings = {"retry_base_s": 0.3, "max_attempts": 3, **more}
    lines = ["", "[notify]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    env = {"TASKWARDEN_INBOX_URL": f"http://127.0.0.1:{port}/inbox"}
    return Workspace(root, policy=policy, extra="\n".join(lines) + "\n", env=env)


def start_server(ws: Any, port: int, log_name: str) -> subprocess.Popen[bytes]:
    """``taskwarden serve --http`` (the daemon with HTTP), as a process the test may kill -9."""
    log = open(ws.root / log_name, "w")  # noqa: SIM115 - the process keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "worker_server", "serve", "--config", str(ws.config), "--http",
         f"127.0.0.1:{port}", "--allow-anonymous"],
        env=ws.server_env(), cwd=ws.work, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip




async def eventually(check: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check()`` until it returns something truthy (the receivers are other threads)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.1)


def webhook_secret(humans_add_output: str) -> str:
    lines = humans_add_output.strip().splitlines()
    assert "X-Taskwarden-Signature" in lines[-2], humans_add_output
    return lines[-1].strip()
