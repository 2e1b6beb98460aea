"""Redaction: secrets never reach the audit trail or the approvals inbox."""

from __future__ import annotations

import pytest

from guard.audit import AuditLog, AuditRecord
from guard.storage.clock import FakeClock
from guard.redaction import REDACTED, is_secret_key, redact, redact_text
from guard.schema import open_guard_db


@pytest.mark.parametrize(
    "key",
    [
        "api_key", "apiKey", "X-Api-Key", "APIKEY", "token", "access_token", "refreshToken",
        "csrf_token", "secret", "client_secret", "password", "passwd", "pwd", "Authorization",
        "auth", "cookie", "Set-Cookie", "private_key", "credential", "credentials",
        "session_key", "aws.secret.access.key", "db:password",
    ],
)  # fmt: skip
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)
    assert redact({key: "value", "other": 1}) == {key: REDACTED, "other": 1}


@pytest.mark.parametrize(
    "key",
    ["tokens_used", "max_tokens", "token_count", "token_type", "tokens", "author", "idempotency_key",
     "session_id", "task_id", "prompt", "keyboard", "monkey"],
)  # fmt: skip
def test_harmless_keys_are_kept(key: str) -> None:
    assert not is_secret_key(key)
    assert redact({key: 42}) == {key: 42}


def test_a_secret_key_hides_whatever_it_holds() -> None:
    args = {"auth": {"user": "bob", "pass": "x"}, "password": None, "token": True, "pwd": 1234}
    assert redact(args) == {"auth": REDACTED, "password": None, "token": True, "pwd": REDACTED}


@pytest.mark.parametrize(
    "secret",
    [
        "sk-proj-4f9Qz1xY7bN3kL0pR8sT2uV6",
        "sk-ant-api03-AbCdEf0123456789_xyz-QRS",
        "sk_live_51HxYzAbCdEf0123456789",
        "pk_test_51HxYzAbCdEf0123456789",
        "ghp_" + "aB3" * 12,
        "gho_" + "Zz9" * 12,
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
        "xoxb-123456789012-abcdefGHIJ",
        "AKIAIOSFODNN7EXAMPLE",
        "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d",
        "Q2xhdWRlIGlzIGFuIEFJIGFzc2lzdGFudC4gMTIzNDU2Nzg5MA==",
        "x9Kf2LmQ7vR1tZ8wYb3NcD5hJ0pS6gE4uA_-x9Kf2LmQ7vR1tZ8",
    ],
)
def test_values_that_look_like_keys(secret: str) -> None:
    assert redact_text(secret) == REDACTED
    assert redact(["ok", {"nested": secret}]) == ["ok", {"nested": REDACTED}]


def test_secrets_inside_text_are_cut_out_and_the_text_kept() -> None:
    key = "sk-abc123def456ghi789jkl012"
    assert redact_text(f"my key is {key}, use it") == "my key is [REDACTED], use it"
    assert redact_text("curl -H 'Authorization: Bearer abc.def-123'") == "curl -H 'Authorization: Bearer [REDACTED]'"
    assert redact_text("send Bearer f00ba7.token.value now") == "send Bearer [REDACTED] now"
    assert redact_text("mysql -u root --password=hunter2 db") == "mysql -u root --password=[REDACTED] db"
    url = "connect to postgres://bob:s3cret@db:5432/app"
    assert redact_text(url) == "connect to postgres://bob:[REDACTED]@db:5432/app"
    assert redact_text('{"API_KEY": "abc 123"}') == '{"API_KEY": [REDACTED]}'
    # Text whose lower case is longer (İ) is matched just the same.
    assert redact_text("İstanbul: PASSWORD=hunter2") == "İstanbul: PASSWORD=[REDACTED]"
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc==\n-----END RSA PRIVATE KEY-----"
    assert redact_text(f"key:\n{pem}\nthanks") == "key:\n[REDACTED]\nthanks"


def test_ordinary_text_is_left_alone() -> None:
    text = (
        "Fix the bug in /home/alice/src/Project2/someModule/File.py using sk-learn; "
        "max_tokens=100 token_count=5; the bearer of good news; see issue #12345."
    )
    assert redact_text(text) == text
    assert redact({"prompt": text, "n": 3, "ok": False}) == {"prompt": text, "n": 3, "ok": False}


def test_redact_copies() -> None:
    original = {"a": [{"token": "x"}]}
    copy = redact(original)
    assert original == {"a": [{"token": "x"}]}
    assert copy == {"a": [{"token": REDACTED}]}


@pytest.mark.anyio
async def test_a_secret_never_reaches_the_database_files(tmp_path) -> None:
    path = tmp_path / "guard.db"
    secret = "ghp_" + "Qw3rTy9" * 6
    db = await open_guard_db(path)
    log = AuditLog(db, FakeClock())
    await log.record(
        AuditRecord(
            identity="alice", session="s1", tool="spawn-task",
            args={"prompt": f"push with {secret} please", "token": "plain-words-token", "env": {"GH": secret}},
            decision="allow", reason=f"note {secret}",
        )
    )  # fmt: skip
    (entry,) = await log.query()
    assert entry.args == {"prompt": "push with [REDACTED] please", "token": REDACTED, "env": {"GH": REDACTED}}
    await log.aclose()

    def assert_absent() -> None:
        for name in ("guard.db", "guard.db-wal", "guard.db-shm"):
            file = tmp_path / name
            data = file.read_bytes() if file.exists() else b""
            assert secret.encode() not in data, name
            assert b"plain-words-token" not in data, name

    assert (tmp_path / "guard.db-wal").exists()  # the row is in the WAL while open
    assert_absent()
    await db.close()  # checkpoints the WAL into the main file
    assert_absent()


def test_oversize_strings_are_cut_at_a_token_boundary_before_any_scan() -> None:
    from guard.redaction import MAX_RECORD_CHARS, MAX_STRING_CHARS, bound

    huge = "sk-" * 70_000
    kept = redact({"title": huge, "token": huge})
    assert kept["token"] == REDACTED
    assert "sk-" not in kept["title"] and "210,000 characters" in kept["title"]
    # A secret that straddles the cut is dropped whole, not halved.
    secret = "ghp_" + "Qw3rTy9" * 6
    text = "word " * (MAX_STRING_CHARS // 5 - 3) + secret + " tail"
    cut = redact_text(text)
    assert len(cut) <= MAX_STRING_CHARS and "ghp_" not in cut and "Qw3r" not in cut
    # Many strings share one budget per record.
    many = bound({f"k{i}": "x" * 1000 for i in range(200)})
    assert sum(len(k) + len(v) for k, v in many.items()) <= MAX_RECORD_CHARS + 200
    assert any("more entries not stored" in str(v) for v in many.values())


def test_a_format_only_detect_secrets_knows_is_redacted_too() -> None:
    # A Telegram bot token: none of taskwarden's own rules match it.
    token = "1234567890:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawZ"
    assert redact_text(f"use bot {token} please") == "use bot [REDACTED] please"


def test_text_size_stops_counting_at_its_limit() -> None:
    from guard.redaction import text_size

    assert text_size({"ab": ["cde", {"f": "gh"}]}, 100) == 8
    assert text_size({"a": "x" * 10**6}, 1025) == 1025
