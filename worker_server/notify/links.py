"""One-click decision links: signed, bound to one approval, one approver and an expiry; used once.

A link is ``{inbox_url}/decide/{token}`` with ``token = payload.signature``:
``payload`` is base64url JSON ``{a: approval id, h: approver, e: expiry, n:
nonce}`` and ``signature`` base64url HMAC-SHA256 over the payload with a
key derived from the database's key file (``guard.digests``: beside the
database, never inside it, so a copy of the database mints no links).

Opening the link (GET) only shows a confirmation page; a POST from that
page decides, spending the nonce in the decision's own transaction, so a
link previewer or mail scanner that fetches it decides nothing, and a link
decides at most once. The approver's role is checked again when they
decide, as for any decision.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from guard.digests import KEY_BYTES, key_path, load_key_file
from guard.storage.database import Database

_CONTEXT = b"taskwarden-decision-link-v1"
MAX_TOKEN = 1024


class LinkProblem(StrEnum):
    MALFORMED = "malformed"  # not a token we made, or changed: the signature does not match
    EXPIRED = "expired"
    USED = "used"


@dataclass(frozen=True)
class DecisionLink:
    approval_id: str
    approver: str
    expires_at: float
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    """Makes and checks decision links with the key of one database."""

    def __init__(self, key: bytes) -> None:
        self._key = hmac.new(key, _CONTEXT, hashlib.sha256).digest()

    @classmethod
    async def for_database(cls, db: Database) -> LinkSigner:
        """Signed with the database's key: a link made by one daemon is accepted by every other."""
        return cls(await db.secret_key("digest", KEY_BYTES))

    @classmethod
    def for_file(cls, db_path: str | Path) -> LinkSigner:
        """The signer of the SQLite file ``db_path`` (for tools outside the daemon)."""
        return cls(load_key_file(key_path(Path(db_path)), KEY_BYTES))

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def token(self, approval_id: str, approver: str, expires_at: float) -> str:
        body = {"a": approval_id, "h": approver, "e": round(expires_at, 3), "n": secrets.token_urlsafe(12)}
        payload = _b64(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
        return f"{payload}.{self._sign(payload)}"

    def url(self, inbox_url: str, approval_id: str, approver: str, expires_at: float) -> str:
        return f"{inbox_url.rstrip('/')}/decide/{self.token(approval_id, approver, expires_at)}"

    def read(self, token: str, now: float) -> DecisionLink | LinkProblem:
        """The link a token stands for, or why it cannot be used (checked before anything is parsed)."""
        if len(token) > MAX_TOKEN or token.count(".") != 1:
            return LinkProblem.MALFORMED
        payload, signature = token.split(".")
        if not hmac.compare_digest(self._sign(payload), signature):
            return LinkProblem.MALFORMED
        try:
            body = json.loads(_unb64(payload))
            link = DecisionLink(str(body["a"]), str(body["h"]), float(body["e"]), str(body["n"]))
        except (ValueError, KeyError, TypeError):
            return LinkProblem.MALFORMED
        if now >= link.expires_at:
            return LinkProblem.EXPIRED
        return link
