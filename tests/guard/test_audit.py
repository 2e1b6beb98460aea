"""The audit trail: what was decided, stored redacted, never rewritten."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from guard.audit import AuditLog, AuditLogClosed, AuditRecord, Decision, InvalidDecision, Outcome
from guard.storage.clock import FakeClock
from guard.digests import Digester, canonical_json, key_path
from guard.storage import integrity_errors, open_database
from guard.schema import open_guard_db

pytestmark = pytest.mark.anyio


@pytest.fixture
async def db(db_target: str):
    """The guard's tables in a fresh database: a SQLite file, then PostgreSQL."""
    database = await open_guard_db(db_target)
    yield database
    await database.close()


def call(tool: str = "spawn-task", decision: str = "allow", **extra) -> AuditRecord:
    fields = dict(identity="alice", session="s1", tool=tool, args={"prompt": "hi"}, decision=decision)
    fields.update(extra)
    return AuditRecord(**fields)


async def test_a_record_is_stored_redacted_with_the_digest_of_the_real_arguments(db) -> None:
    clock = FakeClock(1_700_000_000.0)
    log = AuditLog(db, clock)
    args = {"prompt": "deploy", "api_key": "abc-secret-value"}
    row_id = await log.record(
        AuditRecord(
            identity="alice", session="s1", tool="spawn-task", args=args, decision=Decision.ALLOW,
            rule="spawn-task#1", reason=None, duration_ms=12.5, outcome=Outcome.OK,
        )
    )  # fmt: skip
    (entry,) = await log.query()
    assert entry.id == row_id
    assert entry.args == {"prompt": "deploy", "api_key": "[REDACTED]"}
    digester = await Digester.for_database(db)
    assert entry.args_digest == digester.args(args)
    assert entry.to_dict() == {
        "id": row_id,
        "time": "2023-11-14T22:13:20.000Z",
        "identity": "alice",
        "session": "s1",
        "tool": "spawn-task",
        "args": {"prompt": "deploy", "api_key": "[REDACTED]"},
        "args_digest": digester.args(args),
        "decision": "allow",
        "rule": "spawn-task#1",
        "reason": None,
        "approval_id": None,
        "duration_ms": 12.5,
        "outcome": "ok",
    }


async def test_digests_are_keyed_by_a_0600_file_beside_the_database(tmp_path: Path) -> None:
    import hashlib
    import hmac
    import stat

    db_path = tmp_path / "guard.db"
    db = await open_database(db_path)
    digester = await Digester.for_database(db)
    key_file = key_path(db_path)
    assert key_file.name == "guard.db.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    assert len(key) == 32
    args = {"b": "é", "a": 1}
    assert canonical_json(args) == '{"a":1,"b":"é"}'
    assert digester.args(args) == hmac.new(key, '{"a":1,"b":"é"}'.encode(), hashlib.sha256).hexdigest()
    # Not the plain hash a copied database could be checked against.
    assert digester.args(args) != hashlib.sha256('{"a":1,"b":"é"}'.encode()).hexdigest()
    call = canonical_json({"tool": "t", "args": args, "identity": "i"})
    assert call == '{"args":{"a":1,"b":"é"},"identity":"i","tool":"t"}'
    assert digester.call("t", args, "i") == hmac.new(key, call.encode(), hashlib.sha256).hexdigest()
    # Another process opening the same database reads the same key; another database has its own.
    again = await open_database(db_path)
    other = await open_database(tmp_path / "other.db")
    assert (await Digester.for_database(again)).args(args) == digester.args(args)
    assert (await Digester.for_database(other)).args(args) != digester.args(args)
    for each in (db, again, other):
        await each.close()


async def test_rows_cannot_be_updated_or_deleted(db) -> None:
    log = AuditLog(db, FakeClock())
    await log.record(call())
    with pytest.raises(integrity_errors(), match="append-only: rows cannot be updated"):
        await db.write(lambda c: c.execute("UPDATE guard_audit SET decision = 'deny'"))
    with pytest.raises(integrity_errors(), match="append-only: rows cannot be deleted"):
        await db.write(lambda c: c.execute("DELETE FROM guard_audit"))
    if db.dialect == "postgresql":  # SQLite has no TRUNCATE (its DELETE without WHERE is refused above)
        with pytest.raises(integrity_errors(), match="append-only: rows cannot be truncated"):
            await db.write(lambda c: c.execute("TRUNCATE guard_audit"))
    (entry,) = await log.query()
    assert entry.decision == "allow"


async def test_a_server_databases_digest_key_is_shared_through_the_database(pg_url: str) -> None:
    # The PostgreSQL counterpart of the key file: every daemon connecting reads one key.
    import psycopg

    db = await open_guard_db(pg_url)
    again = await open_guard_db(pg_url)
    try:
        args = {"b": "é", "a": 1}
        first = await Digester.for_database(db)
        assert (await Digester.for_database(again)).args(args) == first.args(args)
        log = AuditLog(again, FakeClock())  # no digester given: the key is read from the database
        row_id = await log.record(call(args=args))
        (entry,) = await log.query()
        assert entry.id == row_id and entry.args_digest == first.args(args)
    finally:
        await db.close()
        await again.close()
    with psycopg.connect(pg_url) as conn:
        (key,) = conn.execute("SELECT key FROM storage_keys WHERE name = 'digest'").fetchone()
    assert len(key) == 32


async def test_an_unknown_decision_is_refused_at_once(db) -> None:
    log = AuditLog(db, FakeClock())
    with pytest.raises(InvalidDecision, match="decision must be one of allow, deny, .*got 'maybe'"):
        log.record(call(decision="maybe"))


async def test_many_concurrent_records_are_all_committed_in_order(db) -> None:
    clock = FakeClock()
    log = AuditLog(db, clock, max_batch=16)
    ids = await asyncio.gather(*(log.record(call(args={"n": n})) for n in range(200)))
    assert ids == sorted(ids) and len(set(ids)) == 200
    entries = await log.query(limit=1000)
    assert [e.args["n"] for e in entries] == list(range(200))


async def test_a_record_not_awaited_is_still_written_before_close(db) -> None:
    log = AuditLog(db, FakeClock())
    future = log.record(call(tool="wait-task"))
    future.cancel()  # the caller stopped waiting; the call still happened
    await log.aclose()
    assert [e.tool for e in await log.query()] == ["wait-task"]
    with pytest.raises(AuditLogClosed):
        log.record(call())


async def test_query_filters(db) -> None:
    clock = FakeClock(1000.0)
    log = AuditLog(db, clock)
    await log.record(call("spawn-task", "allow", outcome="ok"))
    clock.advance(10)
    await log.record(call("spawn-task", "rate_limited", rule="spawn-task#1", reason="30 per 60 s"))
    clock.advance(10)
    await log.record(call("cancel-task", "approval_required", approval_id="apr_abcdefghij"))
    clock.advance(10)
    await log.record(call("cancel-task", "shadow_deny"))

    assert [e.decision for e in await log.query(tool="cancel-task")] == ["approval_required", "shadow_deny"]
    assert [e.tool for e in await log.query(decision="rate_limited")] == ["spawn-task"]
    assert [e.decision for e in await log.query(since=1010.0)] == [
        "rate_limited",
        "approval_required",
        "shadow_deny",
    ]
    assert [e.decision for e in await log.query(since=1010.0, tool="spawn-task")] == ["rate_limited"]
    first, second, *_ = await log.query()
    assert [e.id for e in await log.query(after_id=second.id)] == [second.id + 1, second.id + 2]
    assert [e.decision for e in await log.query(limit=2)] == ["allow", "rate_limited"]
    assert [e.decision for e in await log.query(limit=2, newest=True)] == ["approval_required", "shadow_deny"]
    await log.record(call("list-tasks", "allow", identity="bob"))
    assert [e.tool for e in await log.query(identity="bob")] == ["list-tasks"]
    assert len(await log.query(identity="alice")) == 4
    with pytest.raises(InvalidDecision):
        await log.query(decision="nope")


async def test_records_nobody_waits_for_share_a_commit_and_are_still_written(db) -> None:
    log = AuditLog(db, FakeClock(1000.0), linger_s=0.05)
    lazy = [log.record(call("get-task", "allow", outcome="ok"), urgent=False) for _ in range(5)]
    assert not any(f.done() for f in lazy)
    ids = [await f for f in lazy]
    assert len(set(ids)) == 5
    urgent = log.record(call("cancel-task", "deny", outcome="refused"))
    await urgent
    assert [e.tool for e in await log.query()] == ["get-task"] * 5 + ["cancel-task"]
