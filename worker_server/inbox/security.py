"""The inbox's defences: security headers, the session cookie, CSRF tokens.

- **Headers.** Every response of the inbox app carries a strict
  Content-Security-Policy (``default-src 'self'``: no inline script or style,
  nothing from elsewhere, no framing, forms post only here), ``nosniff``,
  ``Referrer-Policy: no-referrer`` (a sign-in link never leaks through a
  Referer) and ``Cache-Control: no-store`` for pages.
- **Session cookie.** A random id (256 bits); the database keeps only its
  SHA-256. HttpOnly, SameSite=Strict, Path=the inbox's mount, and Secure
  whenever the request came over HTTPS. "Came over HTTPS" is
  ``request.url.scheme``: uvicorn rewrites it from ``X-Forwarded-Proto`` only
  for proxies it trusts (``--forwarded-allow-ips`` / ``$FORWARDED_ALLOW_IPS``,
  default loopback), so a TLS-terminating proxy on the same host works and a
  remote client cannot fake it.
- **CSRF.** Each form carries ``HMAC-SHA256(session id, "taskwarden-inbox-csrf")``;
  a state-changing POST must send it back. The token is bound to the session
  and cannot be computed without the HttpOnly cookie; nothing extra is stored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'; "
    "form-action 'self'; img-src 'self'"
)
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]

COOKIE = "taskwarden_inbox"
CSRF_FIELD = "csrf"
_CSRF_CONTEXT = b"taskwarden-inbox-csrf"


class SecurityHeaders:
    """ASGI middleware: the security headers on every HTTP response, whatever produced it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                add_security_headers(message)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_security_headers(message: MutableMapping[str, Any]) -> None:
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in {h for h, _ in SECURITY_HEADERS}]
    headers.extend(SECURITY_HEADERS)
    if not any(k.lower() == b"cache-control" for k, _ in headers):
        headers.append((b"cache-control", b"no-store"))
    message["headers"] = headers


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def cookie_path(request: Request) -> str:
    return request.scope.get("root_path") or "/"


def session_id(request: Request) -> str | None:
    value = request.cookies.get(COOKIE)
    return value if value and 20 <= len(value) <= 200 else None


def set_session_cookie(response: Response, request: Request, value: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=max_age,
        path=cookie_path(request),
        secure=is_https(request),
        httponly=True,
        samesite="strict",
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path=cookie_path(request), secure=is_https(request), httponly=True, samesite="strict"
    )


def csrf_token(session: str) -> str:
    return hmac.new(session.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def csrf_ok(session: str, sent: object) -> bool:
    return isinstance(sent, str) and hmac.compare_digest(csrf_token(session), sent)


def cross_site(request: Request) -> bool:
    """True when the browser says the request came from another site (Fetch Metadata)."""
    return request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none")
