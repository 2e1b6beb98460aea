"""Who is calling: an identity and an MCP session for every request.

stdio: one client per server process, so the identity comes from the config
(default: the OS user) and the session is this connection. The daemon's
socket: one MCP session per connection, whose forwarder said who it is and
where it runs (``CONNECTION``, set for the life of the connection's tasks). HTTP: a bearer
token maps to an identity through ``[identities.NAME] token_sha256``; the
session is the transport's ``Mcp-Session-Id`` when the client has one.
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

from worker_server.config import IdentityConfig
from worker_server.service import Caller
from worker_server.store import new_id

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


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
        headers = getattr(request, "headers", None) or {}
        transport_session = headers.get("mcp-session-id")
        # 2026-07-28 clients have no transport session; their calls share one
        # session per identity, so session-scoped limits act per identity.
        return Caller(identity=identity, session=transport_session or f"http:{identity}")


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
