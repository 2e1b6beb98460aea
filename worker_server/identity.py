"""Who is calling: an identity and an MCP session for every request.

stdio: one client per server process, so the identity comes from the config
(default: the OS user) and the session is this connection. The daemon's
socket: one MCP session per connection, whose forwarder said who it is and
where it runs (``CONNECTION``, set for the life of the connection's tasks). HTTP: a bearer
token maps to an identity through ``[identities.NAME] token_sha256``; the
session is the transport's own session (``transport_session``), which
2026-07-28 clients do not have: they count per identity.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp_types.version import is_version_at_least

from worker_server.config import IdentityConfig
from worker_server.service import Caller
from worker_server.store import new_id

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
# The first protocol version without transport sessions.
SESSIONLESS_VERSION = "2026-07-28"


@dataclass(frozen=True)
class Connection:
    """A client of the daemon's socket, as its forwarder introduced it."""

    identity: str
    session: str
    cwd: str | None


#: The socket connection the current request came in on (unset: stdio or HTTP).
CONNECTION: ContextVar[Connection | None] = ContextVar("taskwarden_connection", default=None)


class CallerResolver:
    def __init__(self, stdio_identity: str) -> None:
        self.stdio_identity = stdio_identity
        # stdio serves exactly one client connection for the life of the process.
        self.stdio_session = new_id("stdio")

    def caller(self, ctx: Any) -> Caller:
        """The caller of the request whose ``ServerRequestContext`` is ``ctx``."""
        request = getattr(ctx, "request", None)
        if request is None:
            conn = CONNECTION.get()
            if conn is not None:
                return Caller(identity=conn.identity, session=conn.session, cwd=conn.cwd)
            return Caller(identity=self.stdio_identity, session=self.stdio_session)
        token = get_access_token()
        identity = token.client_id if token is not None else ANONYMOUS
        return Caller(identity=identity, session=transport_session(ctx, request) or f"http:{identity}")


def transport_session(ctx: Any, request: Any) -> str | None:
    """The HTTP transport's own session id for this request, or None if it has none.

    Only a handshake-era (2025) request has one: the SDK's stateful session
    manager routes it by its ``Mcp-Session-Id`` header, answers 404 for an id
    it did not issue and binds each session to the credential that opened it,
    so the header a request reaches us with names a real session. A
    2026-07-28 request has no transport session at all, and any
    ``Mcp-Session-Id`` it carries was chosen by the client: trusting it would
    let a fresh header per call escape every session-scoped limit. Such
    clients count per identity.
    """
    version = getattr(ctx, "protocol_version", None)
    if not isinstance(version, str) or is_version_at_least(version, SESSIONLESS_VERSION):
        return None
    headers = getattr(request, "headers", None) or {}
    session = headers.get("mcp-session-id")
    return session if isinstance(session, str) and session else None


class TokenIdentities:
    """The SDK's TokenVerifier: a bearer token is valid if its SHA-256 is configured."""

    def __init__(self, identities: dict[str, IdentityConfig]) -> None:
        self._by_digest = {cfg.token_sha256.lower(): name for name, cfg in identities.items()}

    async def verify_token(self, token: str) -> AccessToken | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, name in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return AccessToken(token=token, client_id=name, scopes=[])
        return None
