"""Digests of calls: keyed, so a copied database cannot be brute-forced for its arguments.

The audit trail's ``args_digest`` and an approval's digest tie a row to the
exact call. A plain sha256 of the arguments lets anyone holding the database
file guess short secrets offline (hash candidates until one matches). So
both are HMAC-SHA256 with a per-database key. A SQLite file's key is kept
*outside* the database: ``<database>.key`` beside it, mode 0600, created on
first use; a PostgreSQL database's key is a row every daemon reads (its
holders are the database's own users). Equal calls
still get equal digests (approvals keep matching, audit rows can be
compared); without the key file the digests say nothing.

The key file is created atomically (written under a temporary name, then
hard-linked into place), so concurrent processes opening one database agree
on one key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from guard.storage.database import Database
from guard.storage.sqlite import KeyFileError as DigestKeyError
from guard.storage.sqlite import key_path, load_key_file

__all__ = ["KEY_BYTES", "DigestKeyError", "Digester", "canonical_json", "key_path", "load_key_file"]

KEY_BYTES = 32


def canonical_json(value: Any) -> str:
    """One spelling per JSON value: sorted keys, no whitespace, Unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class Digester:
    """Keyed digests of calls and arguments for one database."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a digest key needs at least 16 bytes")
        self._key = key

    @classmethod
    async def for_database(cls, db: Database) -> Digester:
        """The digester of ``db``: its key is shared by every process using the database."""
        return cls(await db.secret_key("digest", KEY_BYTES))

    @classmethod
    def for_file_database(cls, db: Database) -> Digester:
        """The same, without awaiting: only a SQLite file's key can be read here."""
        if db.path is None:
            raise RuntimeError("a server database's digest key is read with `await Digester.for_database(db)`")
        return cls(load_key_file(key_path(db.path), KEY_BYTES))

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def args(self, args: Any) -> str:
        """The audit trail's ``args_digest``: HMAC of the canonical, unredacted arguments."""
        return self._mac(canonical_json(args))

    def call(self, tool: str, args: Any, identity: str) -> str:
        """The digest an approval is bound to: tool, canonical arguments and identity."""
        return self._mac(canonical_json({"tool": tool, "args": args, "identity": identity}))
