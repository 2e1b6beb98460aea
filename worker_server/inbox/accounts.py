"""People who work in the inbox: names, one-time sign-in links, web sessions.

``taskwarden humans add NAME`` makes a sign-in token and prints it as a link;
the inbox turns a redeemed token into a web session. Only SHA-256 digests of
tokens and session ids are stored, so a copy of the database signs nobody in.
A sign-in token works once and for ``SIGNIN_TTL_S``; a new link for the same
person replaces any unused older one. Removing a person deletes their links
and sessions: every browser they used is signed out at its next request.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

import anyio

from guard.approvers import ROLES
from guard.storage.clock import Clock, iso
from guard.storage.database import Database, Migrations, Step, Tx

logger = logging.getLogger(__name__)

#: A sign-in link works for this long.
SIGNIN_TTL_S = 7 * 86_400
#: A web session lasts this long after signing in.
SESSION_TTL_S = 30 * 86_400

_NAME_RE = re.compile(r"^[\w][\w .@+-]{0,63}$")

_SQLITE: list[Step] = [
    # 1: people, their sign-in tokens and web sessions
    """
    CREATE TABLE inbox_humans (
        name TEXT PRIMARY KEY COLLATE NOCASE,
        created_at REAL NOT NULL
    );
    CREATE TABLE inbox_signin_tokens (
        token_sha256 TEXT PRIMARY KEY,
        human TEXT NOT NULL COLLATE NOCASE REFERENCES inbox_humans(name) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL
    );
    CREATE INDEX inbox_signin_tokens_human ON inbox_signin_tokens(human);
    CREATE TABLE inbox_sessions (
        id_sha256 TEXT PRIMARY KEY,
        human TEXT NOT NULL COLLATE NOCASE REFERENCES inbox_humans(name) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX inbox_sessions_human ON inbox_sessions(human);
    """,
    # 2: roles and notification channels. People added before roles existed
    # could claim tasks and decide approvals: they become approvers, so an
    # upgrade changes nobody's rights (new people default to worker).
    """
    ALTER TABLE inbox_humans ADD COLUMN role TEXT NOT NULL DEFAULT 'approver'
        CHECK (role IN ('worker', 'approver', 'admin'));
    ALTER TABLE inbox_humans ADD COLUMN email TEXT;
    ALTER TABLE inbox_humans ADD COLUMN webhook TEXT;
    ALTER TABLE inbox_humans ADD COLUMN webhook_secret TEXT;
    """,
]
_POSTGRESQL: list[Step] = [
    # 1: SQLite's steps 1 and 2. Names compare without case as SQLite's
    # NOCASE does, through a case-insensitive (accent-sensitive) ICU collation,
    # so the queries stay the same on both backends.
    """
    CREATE COLLATION IF NOT EXISTS taskwarden_nocase
        (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
    CREATE TABLE inbox_humans (
        name TEXT PRIMARY KEY COLLATE taskwarden_nocase,
        created_at DOUBLE PRECISION NOT NULL,
        role TEXT NOT NULL DEFAULT 'worker' CHECK (role IN ('worker', 'approver', 'admin')),
        email TEXT,
        webhook TEXT,
        webhook_secret TEXT
    );
    CREATE TABLE inbox_signin_tokens (
        token_sha256 TEXT PRIMARY KEY,
        human TEXT NOT NULL COLLATE taskwarden_nocase REFERENCES inbox_humans(name) ON DELETE CASCADE,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION
    );
    CREATE INDEX inbox_signin_tokens_human ON inbox_signin_tokens(human);
    CREATE TABLE inbox_sessions (
        id_sha256 TEXT PRIMARY KEY,
        human TEXT NOT NULL COLLATE taskwarden_nocase REFERENCES inbox_humans(name) ON DELETE CASCADE,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX inbox_sessions_human ON inbox_sessions(human);
    """,
]
STEPS = Migrations(sqlite=_SQLITE, postgresql=_POSTGRESQL)

#: The role ``humans add`` gives a new person unless told otherwise.
DEFAULT_ROLE = "worker"
_EMAIL_RE = re.compile(r"^[^@\s<>]{1,64}@[^@\s<>]{1,255}$")


class InvalidName(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"NAME: {name!r} is not a usable name; use 1..64 letters, digits, spaces and . _ @ + - "
            "(starting with a letter or digit)"
        )


class InvalidChannel(ValueError):
    """A bad --email or --webhook: the message names the option."""


def check_email(address: str) -> str:
    address = address.strip()
    if len(address) > 320 or not _EMAIL_RE.match(address):
        raise InvalidChannel(f"--email: {address!r} is not an e-mail address (name@host, at most 320 characters)")
    return address


def check_webhook(url: str) -> str:
    url = url.strip()
    if len(url) > 2000 or not re.match(r"^https?://[^\s/?#]+[^\s]*$", url):
        raise InvalidChannel(f"--webhook: {url[:100]!r} is not an http(s) URL (at most 2000 characters)")
    return url


class LinkState(StrEnum):
    VALID = "valid"  # unused and unexpired: it signs its person in once
    USED = "used"  # someone already signed in with it
    EXPIRED = "expired"  # older than SIGNIN_TTL_S
    UNKNOWN = "unknown"  # never issued, replaced by a newer link, or its person was removed


@dataclass(frozen=True)
class Human:
    name: str
    created_at: str  # ISO 8601 UTC
    signed_in: bool  # has at least one live web session
    role: str = DEFAULT_ROLE
    email: str | None = None
    webhook: str | None = None


@dataclass(frozen=True)
class Person:
    """A person as notifications see them: where to reach them."""

    name: str
    role: str
    email: str | None
    webhook: str | None
    webhook_secret: str | None


def people(c: Tx) -> builtins.list[Person]:
    """Everyone, inside a caller's transaction (notifications are queued in it)."""
    rows = c.execute("SELECT name, role, email, webhook, webhook_secret FROM inbox_humans ORDER BY name").fetchall()
    return [Person(*tuple(r)) for r in rows]


def role_in(c: Tx, name: str) -> str | None:
    """The role of the person called ``name`` (any case), or None if there is none."""
    row = c.execute("SELECT role FROM inbox_humans WHERE name = ?", (name.strip(),)).fetchone()
    return str(row[0]) if row else None


@dataclass(frozen=True)
class SignIn:
    human: str
    session_id: str  # the raw id: goes into the cookie, never into the database


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    name = name.strip()
    if not _NAME_RE.match(name):
        raise InvalidName(name)
    return name


async def role_of(db: Database, name: str) -> str | None:
    """``guard.commands.RoleOf``: the role of a registered person, None for anyone else."""
    await db.migrate_component("inbox", STEPS)
    return await db.read(lambda c: role_in(c, name))


class Accounts:
    """The inbox's people, stored in ``db`` (tables ``inbox_*``, component "inbox")."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        self._ready = False
        self._lock = anyio.Lock()

    async def _schema(self) -> None:
        if self._ready:
            return
        async with self._lock:
            if not self._ready:
                await self._db.migrate_component("inbox", STEPS)
                self._ready = True

    # -- people (the CLI) ----------------------------------------------------

    async def add(
        self,
        name: str,
        base_url: str,
        *,
        role: str | None = None,
        email: str | None = None,
        webhook: str | None = None,
        webhook_secret: str | None = None,
    ) -> str:
        """Add ``name`` (if new) and return a fresh one-time sign-in link.

        Any unused link issued earlier for this person stops working. For a
        new person ``role`` defaults to ``DEFAULT_ROLE``; for someone already
        here, only what is given changes. A new webhook without a secret gets
        a random one (read it with ``channel_secret``).
        """
        await self._schema()
        name = check_name(name)
        if role is not None and role not in ROLES:
            raise InvalidChannel(f"--role: must be one of {', '.join(ROLES)}, got {role!r}")
        email = check_email(email) if email else None
        webhook = check_webhook(webhook) if webhook else None
        if webhook and not webhook_secret:
            webhook_secret = secrets.token_urlsafe(32)
        token = secrets.token_urlsafe(32)
        now = self._clock.now()

        def tx(c: Tx) -> None:
            if c.execute("SELECT 1 FROM inbox_humans WHERE name = ?", (name,)).fetchone() is None:
                c.execute(
                    "INSERT INTO inbox_humans (name, created_at, role) VALUES (?, ?, ?)",
                    (name, now, role or DEFAULT_ROLE),
                )
            elif role is not None:
                c.execute("UPDATE inbox_humans SET role = ? WHERE name = ?", (role, name))
            if email:
                c.execute("UPDATE inbox_humans SET email = ? WHERE name = ?", (email, name))
            if webhook:
                c.execute(
                    "UPDATE inbox_humans SET webhook = ?, webhook_secret = ? WHERE name = ?",
                    (webhook, webhook_secret, name),
                )
            # Names compare without case: "Alice" and "alice" are one person, spelled as first added.
            stored = c.execute("SELECT name FROM inbox_humans WHERE name = ?", (name,)).fetchone()[0]
            c.execute("DELETE FROM inbox_signin_tokens WHERE human = ? AND used_at IS NULL", (stored,))
            c.execute(
                "INSERT INTO inbox_signin_tokens (token_sha256, human, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (digest(token), stored, now, now + SIGNIN_TTL_S),
            )

        await self._db.write(tx)
        logger.info("sign-in link issued for %s", name)
        return f"{base_url.rstrip('/')}/signin/{token}"

    async def list(self) -> builtins.list[Human]:
        await self._schema()
        now = self._clock.now()

        def read(c: Tx) -> builtins.list[Human]:
            rows = c.execute(
                "SELECT h.name, h.created_at, EXISTS (SELECT 1 FROM inbox_sessions s"
                " WHERE s.human = h.name AND s.expires_at > ?), h.role, h.email, h.webhook"
                " FROM inbox_humans h ORDER BY h.name",
                (now,),
            ).fetchall()
            return [Human(r[0], _iso(r[1]), bool(r[2]), r[3], r[4], r[5]) for r in rows]

        return await self._db.read(read)

    async def role_of(self, name: str) -> str | None:
        """The role of the person called ``name``, or None if nobody is."""
        await self._schema()
        return await self._db.read(lambda c: role_in(c, name))

    async def person(self, name: str) -> Person | None:
        await self._schema()
        found = await self._db.read(lambda c: [p for p in people(c) if p.name.casefold() == name.strip().casefold()])
        return found[0] if found else None

    async def remove(self, name: str) -> bool:
        """Remove a person with their links and sessions; False if there is no such person."""
        await self._schema()

        def tx(c: Tx) -> bool:
            c.execute("DELETE FROM inbox_sessions WHERE human = ?", (name,))
            c.execute("DELETE FROM inbox_signin_tokens WHERE human = ?", (name,))
            return c.execute("DELETE FROM inbox_humans WHERE name = ?", (name,)).rowcount > 0

        removed = await self._db.write(tx)
        if removed:
            logger.info("removed %s and signed them out", name)
        return removed

    # -- signing in (the inbox) ----------------------------------------------

    async def link_state(self, token: str) -> tuple[LinkState, str | None]:
        """What a sign-in link would do now, and whose it is (without using it)."""
        await self._schema()
        now = self._clock.now()
        row = await self._db.read(
            lambda c: c.execute(
                "SELECT human, expires_at, used_at FROM inbox_signin_tokens WHERE token_sha256 = ?",
                (digest(token),),
            ).fetchone()
        )
        if row is None:
            return LinkState.UNKNOWN, None
        if row[2] is not None:
            return LinkState.USED, row[0]
        if row[1] <= now:
            return LinkState.EXPIRED, row[0]
        return LinkState.VALID, row[0]

    async def sign_in(self, token: str) -> SignIn | None:
        """Use a sign-in token (once) and open a web session; None if the token is not valid."""
        await self._schema()
        session_id = secrets.token_urlsafe(32)
        now = self._clock.now()

        def tx(c: Tx) -> str | None:
            row = c.execute(
                "UPDATE inbox_signin_tokens SET used_at = ?"
                " WHERE token_sha256 = ? AND used_at IS NULL AND expires_at > ? RETURNING human",
                (now, digest(token), now),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "INSERT INTO inbox_sessions (id_sha256, human, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (digest(session_id), row[0], now, now + SESSION_TTL_S),
            )
            # Sessions that ran out are of no use to anyone.
            c.execute("DELETE FROM inbox_sessions WHERE expires_at <= ?", (now,))
            return str(row[0])

        human = await self._db.write(tx)
        if human is None:
            return None
        logger.info("%s signed in to the inbox", human)
        return SignIn(human, session_id)

    async def session_human(self, session_id: str) -> str | None:
        """The person a live session belongs to, or None."""
        await self._schema()
        now = self._clock.now()
        row = await self._db.read(
            lambda c: c.execute(
                "SELECT human FROM inbox_sessions WHERE id_sha256 = ? AND expires_at > ?",
                (digest(session_id), now),
            ).fetchone()
        )
        return str(row[0]) if row else None

    async def sign_out(self, session_id: str) -> None:
        await self._schema()
        await self._db.write(
            lambda c: c.execute("DELETE FROM inbox_sessions WHERE id_sha256 = ?", (digest(session_id),))
        )


def _iso(ts: float) -> str:
    return iso(ts) or ""
