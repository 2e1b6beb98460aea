"""Digests of calls: keyed, so a copied database cannot be brute-forced for its arguments.

The audit trail's ``args_digest`` and an approval's digest tie a row to the
exact call. A plain sha256 of the arguments lets anyone holding the database
file guess short secrets offline (hash candidates until one matches). So
both are HMAC-SHA256 with a per-database key kept *outside* the database:
``<database>.key`` beside it, mode 0600, created on first use. Equal calls
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
import os
import secrets
from pathlib import Path
from typing import Any

KEY_BYTES = 32
KEY_SUFFIX = ".key"


class DigestKeyError(RuntimeError):
    """The key file exists but cannot be used (wrong size, unreadable)."""


def canonical_json(value: Any) -> str:
    """One spelling per JSON value: sorted keys, no whitespace, Unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def key_path(db_path: str | Path) -> Path:
    """Where the key of the database at ``db_path`` lives."""
    path = Path(db_path)
    return path.with_name(path.name + KEY_SUFFIX)


def load_or_create_key(db_path: str | Path) -> bytes:
    """The database's digest key, created (0600) if it does not exist yet."""
    path = key_path(db_path)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process linked its key first
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def _read(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise DigestKeyError(f"{path}: a digest key must be {KEY_BYTES} bytes, this file has {len(key)}")
    return key


class Digester:
    """Keyed digests of calls and arguments for one database."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a digest key needs at least 16 bytes")
        self._key = key

    @classmethod
    def for_database(cls, db_path: str | Path) -> Digester:
        return cls(load_or_create_key(db_path))

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def args(self, args: Any) -> str:
        """The audit trail's ``args_digest``: HMAC of the canonical, unredacted arguments."""
        return self._mac(canonical_json(args))

    def call(self, tool: str, args: Any, identity: str) -> str:
        """The digest an approval is bound to: tool, canonical arguments and identity."""
        return self._mac(canonical_json({"tool": tool, "args": args, "identity": identity}))
