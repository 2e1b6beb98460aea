"""The two channels: a signed JSON webhook and an e-mail over SMTP.

**Webhook.** ``POST`` of a JSON object whose ``text`` is the whole message
(Slack and Mattermost incoming webhooks show it as is), plus the fields a
program wants (``event``, ``title``, ``link``, ``decide_link``, ids).
``X-Taskwarden-Signature: sha256=<hex>`` is HMAC-SHA256 of the exact body
with the channel's secret (when it has one); ``X-Taskwarden-Delivery`` is the
notification id, the same on every retry, so a receiver can drop repeats.
Any 2xx answer is a delivery; anything else, or no answer, is a failed attempt.

**E-mail.** A multipart message: plain text, and HTML rendered from an
autoescaping template in which the only markup taken from the event (the
task's brief, a message) has passed the inbox's sanitiser
(``worker_server.inbox.rendering.render``: Markdown → nh3).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import jinja2

from worker_server.config import NotifyConfig
from worker_server.inbox.rendering import render

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_TEMPLATES.filters["markdown"] = render


class DeliveryError(Exception):
    """One attempt failed; the message says how (shown by ``taskwarden notify list``)."""


def signature(secret: str, body: bytes) -> str:
    """The ``X-Taskwarden-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def message_text(payload: dict[str, Any], decide_link: str | None) -> str:
    lines = [payload["title"], payload["text"]]
    if payload.get("brief"):
        lines.append(payload["brief"] if len(payload["brief"]) <= 500 else payload["brief"][:499] + "…")
    lines.append(f"Open: {payload['link']}")
    if decide_link:
        lines.append(f"Approve or deny (one click, then confirm): {decide_link}")
    return "\n".join(lines)


async def send_webhook(
    url: str, secret: str | None, notification_id: str, event: str, payload: dict[str, Any],
    decide_link: str | None, timeout_s: float,
) -> None:  # fmt: skip
    body = json.dumps(
        {
            "text": message_text(payload, decide_link),
            "event": event,
            "id": notification_id,
            "title": payload["title"],
            "link": payload["link"],
            "decide_link": decide_link,
            "task_id": payload.get("task_id"),
            "approval_id": payload.get("approval_id"),
            "recipient": payload.get("recipient"),
        },
        ensure_ascii=False,
    ).encode()
    headers = {
        "content-type": "application/json",
        "user-agent": "taskwarden-notify",
        "x-taskwarden-delivery": notification_id,
        "x-taskwarden-event": event,
    }
    if secret:
        headers["x-taskwarden-signature"] = signature(secret, body)
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            answer = await client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise DeliveryError(f"webhook {url}: {type(exc).__name__}: {exc}") from None
    if not 200 <= answer.status_code < 300:
        raise DeliveryError(f"webhook {url}: HTTP {answer.status_code} {answer.text[:200]!r}")


def build_email(
    config: NotifyConfig, to: str, notification_id: str, payload: dict[str, Any], decide_link: str | None
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = config.email_from
    message["To"] = to
    # One line, whatever the title holds: no header injection.
    message["Subject"] = " ".join(str(payload["title"]).split())[:200]
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid("taskwarden")
    message["X-Taskwarden-Delivery"] = notification_id
    message.set_content(message_text(payload, decide_link))
    html = _TEMPLATES.get_template("email.html").render(p=payload, decide_link=decide_link)
    message.add_alternative(html, subtype="html")
    return message


async def send_email(config: NotifyConfig, message: EmailMessage) -> None:
    if not config.smtp_host:
        raise DeliveryError("e-mail: no SMTP server configured ([notify] smtp_host)")
    context = ssl.create_default_context(cafile=str(config.smtp_ca_file) if config.smtp_ca_file else None)
    try:
        await aiosmtplib.send(
            message,
            hostname=config.smtp_host,
            port=config.smtp_port,
            username=config.smtp_username,
            password=config.smtp_password,
            use_tls=config.smtp_security == "tls",
            start_tls=True if config.smtp_security == "starttls" else False,
            tls_context=context if config.smtp_security != "none" else None,
            timeout=config.timeout_s,
        )
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"e-mail to {message['To']}: {type(exc).__name__}: {exc}") from None
