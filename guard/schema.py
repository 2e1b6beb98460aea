"""The guard's tables, versioned on their own beside the host application's.

``STEPS`` is append-only: a released step is never edited, a change is a new
step. ``Database.migrate_component("guard", STEPS)`` applies the missing ones.
"""

from __future__ import annotations

from pathlib import Path

from guard.storage import open_database
from guard.storage.database import Database, Migrations

# 1: the rate-limit log, approvals and the audit trail.
_V1 = """
-- One row per unit of room taken in a rate-limit counter: a sliding-window log.
-- A counter is keyed by (counter, scope, scope_value); scope_value is the
-- session id, the identity, or '' for the global scope. Times are integer
-- microseconds since the epoch so window arithmetic is exact.
-- AUTOINCREMENT: ids are never reused, so releasing an old reservation can
-- never delete somebody else's hit.
CREATE TABLE guard_limit_hits (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    counter     TEXT    NOT NULL,
    scope       TEXT    NOT NULL CHECK (scope IN ('session', 'identity', 'global')),
    scope_value TEXT    NOT NULL,
    at_us       INTEGER NOT NULL,
    cost        INTEGER NOT NULL CHECK (cost > 0)
);
-- Covers the window query (key + time range, summing cost) without table lookups.
CREATE INDEX guard_limit_hits_by_key
    ON guard_limit_hits (counter, scope, scope_value, at_us, cost);

-- The longest window any limit has asked of a counter: hits younger than
-- this are kept, older ones are pruned.
CREATE TABLE guard_limit_counters (
    counter   TEXT PRIMARY KEY,
    retain_us INTEGER NOT NULL
);

-- The sum of cost over each key's rows in guard_limit_hits, kept by triggers,
-- so a check costs O(1) however many hits a window holds.
CREATE TABLE guard_limit_totals (
    counter     TEXT    NOT NULL,
    scope       TEXT    NOT NULL,
    scope_value TEXT    NOT NULL,
    total       INTEGER NOT NULL,
    PRIMARY KEY (counter, scope, scope_value)
) WITHOUT ROWID;
CREATE TRIGGER guard_limit_hits_added AFTER INSERT ON guard_limit_hits
BEGIN
    INSERT INTO guard_limit_totals (counter, scope, scope_value, total)
    VALUES (new.counter, new.scope, new.scope_value, new.cost)
    ON CONFLICT (counter, scope, scope_value) DO UPDATE SET total = total + excluded.total;
END;
CREATE TRIGGER guard_limit_hits_removed AFTER DELETE ON guard_limit_hits
BEGIN
    UPDATE guard_limit_totals SET total = total - old.cost
    WHERE counter = old.counter AND scope = old.scope AND scope_value = old.scope_value;
END;

CREATE TABLE guard_approvals (
    id            TEXT PRIMARY KEY,          -- "apr_" + 10 base32 characters
    digest        TEXT NOT NULL,             -- sha256 of canonical {tool, args, identity}
    status        TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
    tool          TEXT NOT NULL,
    args          TEXT NOT NULL,             -- redacted arguments, JSON
    identity      TEXT NOT NULL,
    session       TEXT,
    rule_id       TEXT,
    reason        TEXT,                      -- why the rule wants approval
    created_at    REAL NOT NULL,             -- seconds since the epoch
    expires_at    REAL NOT NULL,
    decided_at    REAL,
    decided_by    TEXT,
    decision_note TEXT,                      -- approve comment / deny reason
    used_at       REAL                       -- set once, when the approved call runs
);
CREATE INDEX guard_approvals_by_digest ON guard_approvals (digest, created_at);
CREATE INDEX guard_approvals_by_status ON guard_approvals (status, expires_at);

CREATE TABLE guard_audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time        REAL    NOT NULL,            -- seconds since the epoch
    identity    TEXT    NOT NULL,
    session     TEXT,
    tool        TEXT    NOT NULL,
    args        TEXT    NOT NULL,            -- redacted arguments, JSON
    args_digest TEXT    NOT NULL,            -- sha256 of the canonical, unredacted arguments
    decision    TEXT    NOT NULL,
    rule        TEXT,
    reason      TEXT,
    approval_id TEXT,
    duration_ms REAL,
    outcome     TEXT
);
CREATE INDEX guard_audit_by_time ON guard_audit (time);
CREATE INDEX guard_audit_by_tool ON guard_audit (tool, time);

-- Append-only: rows can be added, never changed or removed.
CREATE TRIGGER guard_audit_no_update BEFORE UPDATE ON guard_audit
BEGIN
    SELECT RAISE(ABORT, 'guard_audit is append-only: rows cannot be updated');
END;
CREATE TRIGGER guard_audit_no_delete BEFORE DELETE ON guard_audit
BEGIN
    SELECT RAISE(ABORT, 'guard_audit is append-only: rows cannot be deleted');
END;
"""

# 2: spend budgets (guard.budgets): an append-only usage log in exact
# integer units, the last known spec of each budget, and its crossings.
_V2 = """
CREATE TABLE guard_budget_usage (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    budget      TEXT    NOT NULL,
    scope       TEXT    NOT NULL CHECK (scope IN ('session', 'identity', 'global')),
    scope_value TEXT    NOT NULL,
    at_us       INTEGER NOT NULL,
    tokens      INTEGER NOT NULL CHECK (tokens >= 0),
    cost_nusd   INTEGER NOT NULL CHECK (cost_nusd >= 0),   -- nano-dollars
    worker_us   INTEGER NOT NULL CHECK (worker_us >= 0),
    task        TEXT
);
CREATE INDEX guard_budget_usage_by_key
    ON guard_budget_usage (budget, scope, scope_value, at_us, tokens, cost_nusd, worker_us);
CREATE TRIGGER guard_budget_usage_no_update BEFORE UPDATE ON guard_budget_usage
BEGIN
    SELECT RAISE(ABORT, 'guard_budget_usage is append-only');
END;
CREATE TABLE guard_budgets (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL      -- JSON: limits, window, scope (for `taskwarden budgets`)
);
CREATE TABLE guard_budget_overruns (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    budget      TEXT    NOT NULL,
    scope_value TEXT    NOT NULL,
    task        TEXT,
    at_us       INTEGER NOT NULL,
    message     TEXT    NOT NULL,
    shadow      INTEGER NOT NULL   -- 1: shadow mode, nothing was stopped
);
CREATE INDEX guard_budget_overruns_by_task ON guard_budget_overruns (task, budget);
"""

# 3: who may approve and how many (guard.approvers): the rule's settings are
# copied onto the approval when it opens; every decision is a row of its own.
_V3 = """
ALTER TABLE guard_approvals ADD COLUMN approvers TEXT;          -- JSON list of names/roles; NULL: any approver
ALTER TABLE guard_approvals ADD COLUMN quorum INTEGER NOT NULL DEFAULT 1;
ALTER TABLE guard_approvals ADD COLUMN escalate_after_s REAL;
ALTER TABLE guard_approvals ADD COLUMN escalate_to TEXT;        -- JSON list of names/roles
CREATE TABLE guard_approval_decisions (
    approval_id TEXT NOT NULL REFERENCES guard_approvals(id),
    decided_by  TEXT NOT NULL,               -- one decision per person and approval
    decision    TEXT NOT NULL CHECK (decision IN ('approve', 'deny')),
    channel     TEXT NOT NULL,               -- cli | inbox | link | client
    comment     TEXT,
    decided_at  REAL NOT NULL,
    PRIMARY KEY (approval_id, decided_by)
);
"""

# PostgreSQL: one step holds everything the three SQLite steps made. Integers
# are BIGINT (microsecond times overflow int4), seconds DOUBLE PRECISION (REAL
# is float4 there), AUTOINCREMENT is an identity column, triggers are plpgsql.
_PG1 = """
CREATE TABLE guard_limit_hits (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    counter     TEXT   NOT NULL,
    scope       TEXT   NOT NULL CHECK (scope IN ('session', 'identity', 'global')),
    scope_value TEXT   NOT NULL,
    at_us       BIGINT NOT NULL,
    cost        BIGINT NOT NULL CHECK (cost > 0)
);
CREATE INDEX guard_limit_hits_by_key
    ON guard_limit_hits (counter, scope, scope_value, at_us, cost);

CREATE TABLE guard_limit_counters (
    counter   TEXT PRIMARY KEY,
    retain_us BIGINT NOT NULL
);

CREATE TABLE guard_limit_totals (
    counter     TEXT   NOT NULL,
    scope       TEXT   NOT NULL,
    scope_value TEXT   NOT NULL,
    total       BIGINT NOT NULL,
    PRIMARY KEY (counter, scope, scope_value)
);
CREATE FUNCTION guard_limit_hits_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO guard_limit_totals AS t (counter, scope, scope_value, total)
    VALUES (NEW.counter, NEW.scope, NEW.scope_value, NEW.cost)
    ON CONFLICT (counter, scope, scope_value) DO UPDATE SET total = t.total + excluded.total;
    RETURN NULL;
END $$;
CREATE TRIGGER guard_limit_hits_added AFTER INSERT ON guard_limit_hits
    FOR EACH ROW EXECUTE FUNCTION guard_limit_hits_added();
CREATE FUNCTION guard_limit_hits_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE guard_limit_totals SET total = total - OLD.cost
    WHERE counter = OLD.counter AND scope = OLD.scope AND scope_value = OLD.scope_value;
    RETURN NULL;
END $$;
CREATE TRIGGER guard_limit_hits_removed AFTER DELETE ON guard_limit_hits
    FOR EACH ROW EXECUTE FUNCTION guard_limit_hits_removed();

CREATE TABLE guard_approvals (
    id               TEXT PRIMARY KEY,
    digest           TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
    tool             TEXT NOT NULL,
    args             TEXT NOT NULL,
    identity         TEXT NOT NULL,
    session          TEXT,
    rule_id          TEXT,
    reason           TEXT,
    created_at       DOUBLE PRECISION NOT NULL,
    expires_at       DOUBLE PRECISION NOT NULL,
    decided_at       DOUBLE PRECISION,
    decided_by       TEXT,
    decision_note    TEXT,
    used_at          DOUBLE PRECISION,
    approvers        TEXT,
    quorum           BIGINT NOT NULL DEFAULT 1,
    escalate_after_s DOUBLE PRECISION,
    escalate_to      TEXT,
    -- Insertion order, the tie-break SQLite's rowid gives between equal created_at.
    seq              BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
);
CREATE INDEX guard_approvals_by_digest ON guard_approvals (digest, created_at);
CREATE INDEX guard_approvals_by_status ON guard_approvals (status, expires_at);
CREATE TABLE guard_approval_decisions (
    approval_id TEXT NOT NULL REFERENCES guard_approvals(id),
    decided_by  TEXT NOT NULL,
    decision    TEXT NOT NULL CHECK (decision IN ('approve', 'deny')),
    channel     TEXT NOT NULL,
    comment     TEXT,
    decided_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (approval_id, decided_by)
);

CREATE TABLE guard_audit (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    time        DOUBLE PRECISION NOT NULL,
    identity    TEXT NOT NULL,
    session     TEXT,
    tool        TEXT NOT NULL,
    args        TEXT NOT NULL,
    args_digest TEXT NOT NULL,
    decision    TEXT NOT NULL,
    rule        TEXT,
    reason      TEXT,
    approval_id TEXT,
    duration_ms DOUBLE PRECISION,
    outcome     TEXT
);
CREATE INDEX guard_audit_by_time ON guard_audit (time);
CREATE INDEX guard_audit_by_tool ON guard_audit (tool, time);
-- Append-only: UPDATE, DELETE and TRUNCATE are refused.
CREATE FUNCTION guard_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: rows cannot be %', TG_TABLE_NAME,
        CASE TG_OP WHEN 'UPDATE' THEN 'updated' WHEN 'DELETE' THEN 'deleted' ELSE 'truncated' END
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER guard_audit_no_update BEFORE UPDATE ON guard_audit
    FOR EACH ROW EXECUTE FUNCTION guard_refuse_change();
CREATE TRIGGER guard_audit_no_delete BEFORE DELETE ON guard_audit
    FOR EACH ROW EXECUTE FUNCTION guard_refuse_change();
CREATE TRIGGER guard_audit_no_truncate BEFORE TRUNCATE ON guard_audit
    FOR EACH STATEMENT EXECUTE FUNCTION guard_refuse_change();

CREATE TABLE guard_budget_usage (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    budget      TEXT   NOT NULL,
    scope       TEXT   NOT NULL CHECK (scope IN ('session', 'identity', 'global')),
    scope_value TEXT   NOT NULL,
    at_us       BIGINT NOT NULL,
    tokens      BIGINT NOT NULL CHECK (tokens >= 0),
    cost_nusd   BIGINT NOT NULL CHECK (cost_nusd >= 0),
    worker_us   BIGINT NOT NULL CHECK (worker_us >= 0),
    task        TEXT
);
CREATE INDEX guard_budget_usage_by_key
    ON guard_budget_usage (budget, scope, scope_value, at_us, tokens, cost_nusd, worker_us);
CREATE TRIGGER guard_budget_usage_no_update BEFORE UPDATE ON guard_budget_usage
    FOR EACH ROW EXECUTE FUNCTION guard_refuse_change();
CREATE TABLE guard_budgets (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL
);
CREATE TABLE guard_budget_overruns (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    budget      TEXT   NOT NULL,
    scope_value TEXT   NOT NULL,
    task        TEXT,
    at_us       BIGINT NOT NULL,
    message     TEXT   NOT NULL,
    shadow      BIGINT NOT NULL
);
CREATE INDEX guard_budget_overruns_by_task ON guard_budget_overruns (task, budget);
"""

STEPS = Migrations(sqlite=[_V1, _V2, _V3], postgresql=[_PG1])


async def migrate(db: Database) -> int:
    """Bring the guard's tables in ``db`` up to date; returns the guard schema version."""
    return await db.migrate_component("guard", STEPS)


async def open_guard_db(path: str | Path) -> Database:
    """Open (creating if needed) the database at ``path`` with the guard's tables."""
    db = await open_database(path)
    try:
        await migrate(db)
    except BaseException:
        await db.close()
        raise
    return db
