"""Git around a turn: what it changed, and worktrees for isolated sessions.

What a turn changed is the difference between two snapshots of the work tree
(tracked and untracked files, ignored ones left out), each written as a git
tree through a throw-away index — the user's index, branches and stash are
never touched. Only objects are added to the repository, as ``git stash
create`` would; ``git gc`` drops them in time.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import anyio

from worker_server.process_group import helper_env

# A listing stays small however much a turn rewrote.
MAX_FILES = 200
GIT_TIMEOUT_S = 60.0
# Neither the user's git config hooks nor a pager nor a prompt for credentials.
_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_PAGER": "cat", "LC_ALL": "C"}
_STATUS = {"A": "added", "M": "modified", "D": "deleted", "R": "renamed", "T": "type_changed"}


class GitError(Exception):
    pass


async def _git(cwd: str, *args: str, env: dict[str, str] | None = None) -> str:
    with anyio.fail_after(GIT_TIMEOUT_S):
        proc = await anyio.run_process(
            ["git", *args], cwd=cwd, env={**os.environ, **_ENV, **helper_env(), **(env or {})}, check=False,
            stdin=subprocess.DEVNULL,
        )
    if proc.returncode != 0:
        raise GitError(proc.stderr.decode(errors="replace").strip() or f"git {args[0]} failed")
    return proc.stdout.decode(errors="surrogateescape")


async def toplevel(cwd: str) -> str | None:
    """The root of the git work tree ``cwd`` lies in, or None."""
    if not _may_be_in_work_tree(cwd):
        return None  # spares a git process per turn outside any repository
    try:
        out = await _git(cwd, "rev-parse", "--is-inside-work-tree", "--show-toplevel")
    except (GitError, OSError):
        return None
    lines = out.splitlines()
    return lines[1] if len(lines) == 2 and lines[0] == "true" else None


def _may_be_in_work_tree(cwd: str) -> bool:
    """False only when git certainly sees no work tree: no ``.git`` in ``cwd`` or
    above, and no environment that points git elsewhere."""
    if any(name in os.environ for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_CEILING_DIRECTORIES")):
        return True
    path = Path(cwd).absolute()
    return any((directory / ".git").exists() for directory in (path, *path.parents))


async def snapshot(cwd: str) -> str | None:
    """A git tree of the work tree as it is now; None if ``cwd`` is not in one (or git fails)."""
    if await toplevel(cwd) is None:
        return None
    with tempfile.TemporaryDirectory(prefix="taskwarden-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        try:
            try:
                await _git(cwd, "read-tree", "HEAD", env=env)
            except GitError:
                await _git(cwd, "read-tree", "--empty", env=env)  # a repository without commits
            await _git(cwd, "add", "--all", "--", ":/", env=env)
            return (await _git(cwd, "write-tree", env=env)).strip()
        except (GitError, OSError, TimeoutError):
            return None


async def changes(cwd: str, before: str, after: str) -> dict[str, Any] | None:
    """The files that differ between two snapshots, with insertions and deletions."""
    try:
        names = await _git(cwd, "diff-tree", "-r", "-z", "--no-renames", "--name-status", before, after)
        counts = await _git(cwd, "diff-tree", "-r", "-z", "--no-renames", "--numstat", before, after)
    except (GitError, OSError, TimeoutError):
        return None
    fields = names.split("\0")
    status_of: dict[str, str] = {}
    for code, path in zip(fields[0::2], fields[1::2], strict=False):
        if path:
            status_of[path] = _STATUS.get(code[:1], "modified")
    files: list[dict[str, Any]] = []
    insertions = deletions = 0
    for record in counts.split("\0"):
        parts = record.split("\t", 2)
        if len(parts) != 3:
            continue
        added, removed, path = parts
        ins = int(added) if added.isdigit() else None  # "-" for binary files
        dels = int(removed) if removed.isdigit() else None
        insertions += ins or 0
        deletions += dels or 0
        if len(files) < MAX_FILES:
            files.append({"path": path, "status": status_of.get(path, "modified"), "insertions": ins, "deletions": dels})
    return {"files": files, "insertions": insertions, "deletions": deletions, "truncated": len(status_of) > len(files)}


async def add_worktree(cwd: str, root: Path, name: str, branch: str) -> str:
    """``git worktree add`` of the repository ``cwd`` lies in, at HEAD, on a new ``branch``.

    Returns the directory to run in: the worktree itself, or the same
    subdirectory of it that ``cwd`` is of its repository.
    """
    top = await toplevel(cwd)
    if top is None:
        raise GitError(f"{cwd} is not inside a git work tree")
    try:
        await _git(cwd, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    except GitError:
        raise GitError(f"the repository at {top} has no commit to branch from") from None
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = root / name
    await _git(cwd, "worktree", "add", "--quiet", "-b", branch, str(path), "HEAD")
    relative = Path(cwd).resolve().relative_to(Path(top).resolve())
    return str(path / relative) if str(relative) != "." else str(path)


async def remove_worktree(cwd: str, path: str, branch: str) -> None:
    """Undo ``add_worktree`` (best effort: only for one nobody has used)."""
    try:
        await _git(cwd, "worktree", "remove", "--force", await toplevel(path) or path)
        if branch:
            await _git(cwd, "branch", "-D", branch)
    except (GitError, OSError, TimeoutError):
        pass
