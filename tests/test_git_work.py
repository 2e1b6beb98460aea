"""What a turn changed, from snapshots of a real git work tree; worktrees for sessions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from worker_server import git_work

pytestmark = pytest.mark.anyio


def repo(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=path, check=True)
    subprocess.run(["git", "config", "user.email", "t@example.com"], cwd=path, check=True)
    subprocess.run(["git", "config", "user.name", "T"], cwd=path, check=True)
    (path / "kept.txt").write_text("a\nb\nc\n")
    (path / "gone.txt").write_text("x\n")
    (path / ".gitignore").write_text("*.log\n")
    subprocess.run(["git", "add", "."], cwd=path, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "start"], cwd=path, check=True)
    return path


def git_state(path: Path) -> tuple[str, str]:
    status = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True).stdout
    stash = subprocess.run(["git", "stash", "list"], cwd=path, capture_output=True, text=True).stdout
    return status, stash


async def test_changes_are_what_the_turn_did_not_what_was_dirty_before(tmp_path: Path) -> None:
    work = repo(tmp_path / "r")
    (work / "kept.txt").write_text("a\nb\nc\nd\n")  # dirty before the turn: not the turn's change
    before_state = git_state(work)
    before = await git_work.snapshot(str(work))
    assert git_state(work) == before_state  # the user's index is untouched

    (work / "kept.txt").write_text("a\nB\nc\nd\n")
    (work / "gone.txt").unlink()
    (work / "new.bin").write_bytes(b"\0\1\2")
    (work / "noise.log").write_text("ignored\n")
    after = await git_work.snapshot(str(work))
    assert before and after
    changes = await git_work.changes(str(work), before, after)
    assert changes == {
        "files": [
            {"path": "gone.txt", "status": "deleted", "insertions": 0, "deletions": 1},
            {"path": "kept.txt", "status": "modified", "insertions": 1, "deletions": 1},
            {"path": "new.bin", "status": "added", "insertions": None, "deletions": None},
        ],
        "insertions": 1,
        "deletions": 2,
        "truncated": False,
    }


async def test_changes_are_bounded(tmp_path: Path) -> None:
    work = repo(tmp_path / "r")
    before = await git_work.snapshot(str(work))
    for i in range(git_work.MAX_FILES + 50):
        (work / f"f{i:03}.txt").write_text("x\n")
    after = await git_work.snapshot(str(work))
    changes = await git_work.changes(str(work), before or "", after or "")
    assert changes is not None
    assert len(changes["files"]) == git_work.MAX_FILES and changes["truncated"] is True
    assert changes["insertions"] == git_work.MAX_FILES + 50  # the totals count every file


async def test_no_snapshot_outside_a_work_tree(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert await git_work.snapshot(str(plain)) is None


async def test_a_worktree_on_its_own_branch_at_the_same_subdirectory(tmp_path: Path) -> None:
    work = repo(tmp_path / "r")
    (work / "sub").mkdir()
    (work / "sub" / "f.txt").write_text("f\n")
    subprocess.run(["git", "add", "."], cwd=work, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "sub"], cwd=work, check=True)
    path = await git_work.add_worktree(str(work / "sub"), tmp_path / "trees", "ses_1", "taskwarden/ses_1")
    assert path == str(tmp_path / "trees" / "ses_1" / "sub")
    assert (Path(path) / "f.txt").read_text() == "f\n"
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=path, capture_output=True, text=True).stdout
    assert branch.strip() == "taskwarden/ses_1"
    await git_work.remove_worktree(str(work), path, "taskwarden/ses_1")
    assert not (tmp_path / "trees" / "ses_1").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=empty, check=True)
    with pytest.raises(git_work.GitError, match="no commit"):
        await git_work.add_worktree(str(empty), tmp_path / "trees", "ses_2", "taskwarden/ses_2")
