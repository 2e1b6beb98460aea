"""taskwarden's own sandbox around every worker turn (bubblewrap).

Inside, the root file system is read-only; the turn's ``cwd``, its scratch
directory (mounted at ``/tmp``) and the worker CLI's own state directories
(``~/.codex``, ``~/.claude``...) are writable; taskwarden's database
directory, its log directory and any path in ``sandbox_hide`` are replaced by
an empty read-only tmpfs, so nothing a worker runs can read the database or
decide an approval in it. The policy and config files stay read-only even
when they lie inside a writable directory.

The turn gets its own user, PID and IPC namespaces and no capabilities.
When taskwarden runs as root, the sandbox runs the worker as ``nobody`` in
that user namespace: nothing inside is root, and the CLIs' own sandboxes
(Codex nests bubblewrap) can map their user, which the kernel refuses for
uid 0 without CAP_SETFCAP. The network is shared: the agent CLIs need their
model APIs.

Process groups: ``bwrap`` leads the turn's group. It dies at once on SIGTERM
(and, with ``--die-with-parent``, the whole PID namespace with it), so a
gentle stop signals the processes inside and spares the two bwrap processes
(see ``wrapper_pids``); when the worker's main process exits, the namespace
ends and the kernel kills whatever it left behind, ``setsid`` escapees
included.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Backend = Literal["bwrap", "none"]

#: Where the turn's scratch directory appears inside the sandbox.
SCRATCH_MOUNT = "/tmp"
# Who runs inside when taskwarden itself is root (see the module docstring).
NOBODY = 65534


class SandboxError(Exception):
    """The sandbox cannot be set up as configured; the message says what to do."""


@dataclass(frozen=True)
class Sandbox:
    """How turns are wrapped: the backend and the paths it must hide or protect."""

    backend: Backend = "bwrap"
    executable: str | None = None
    # Replaced by an empty read-only tmpfs inside the sandbox.
    hidden: tuple[Path, ...] = ()
    # Bound read-only on top of anything writable that contains them.
    read_only: tuple[Path, ...] = ()
    uid: int = field(default_factory=os.getuid)

    @classmethod
    def create(cls, backend: Backend, *, hidden: Sequence[Path] = (), read_only: Sequence[Path] = ()) -> Sandbox:
        """The sandbox for this machine; refuses to start when bwrap is wanted and cannot run."""
        if backend == "none":
            return cls(backend="none")
        exe = shutil.which("bwrap")
        if exe is None:
            raise SandboxError(
                'sandbox_backend = "bwrap" but bwrap is not installed: install bubblewrap '
                '(Debian/Ubuntu: apt install bubblewrap), or set sandbox_backend = "none" to run '
                "workers without taskwarden's sandbox (not recommended: a worker can then read the "
                "database and decide approvals)"
            )
        sandbox = cls(
            backend="bwrap",
            executable=exe,
            # Resolved: bwrap mounts on the real path, not on a symlink to it.
            hidden=tuple(_absolute(p).resolve() for p in hidden),
            read_only=tuple(_absolute(p).resolve() for p in read_only),
        )
        sandbox.probe()
        return sandbox

    @property
    def enabled(self) -> bool:
        return self.backend == "bwrap"

    def probe(self) -> None:
        """Run ``true`` in the sandbox once, so a machine where bwrap cannot work says so at start."""
        with tempfile.TemporaryDirectory(prefix="taskwarden-probe-") as place:
            argv = self.wrap(["true"], cwd=Path(place), scratch=Path(place))
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SandboxError(f"bwrap could not be run: {exc}") from None
        if done.returncode != 0:
            raise SandboxError(
                f"bwrap does not work on this machine ({done.stderr.strip() or f'exit {done.returncode}'}); "
                "unprivileged user namespaces may be disabled. Enable them, or set "
                'sandbox_backend = "none" to run workers unsandboxed'
            )

    def wrap(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        scratch: Path | None,
        state_paths: Sequence[Path] = (),
        tmpdir: str | None = None,
        search_path: str | None = None,
    ) -> list[str]:
        """The command line that runs ``argv`` inside the sandbox (``argv`` itself for "none").

        ``scratch`` appears at ``/tmp``, and at ``tmpdir`` (the turn's ``$TMPDIR``) when that
        is elsewhere; without one, ``TMPDIR`` is set to ``/tmp``. ``search_path`` is the
        turn's ``$PATH``: programs found through it stay reachable (see ``_under_scratch``)."""
        if not self.enabled:
            return list(argv)
        cwd = _absolute(cwd)
        hidden = [p for p in self.hidden if p.exists()]  # nothing there yet: nothing to hide
        if cwd in hidden:
            raise SandboxError(
                f"cwd {cwd} is taskwarden's own data directory, which the sandbox hides from workers; "
                "use another directory"
            )
        # Mounts apply in order, so each is placed by depth: a directory
        # mounted later inside one mounted earlier shows through it. At the
        # same depth a hidden or read-only path comes last and wins.
        mounts: list[tuple[int, int, list[str]]] = []

        def add(dest: Path, rank: int, args: list[str]) -> None:
            mounts.append((len(dest.parts), rank, args))

        moved_tmp = tmpdir is not None and os.path.isabs(tmpdir) and _absolute(tmpdir) != Path(SCRATCH_MOUNT)
        if scratch is not None:
            add(Path(SCRATCH_MOUNT), 0, ["--bind", str(scratch), SCRATCH_MOUNT])
            if moved_tmp:
                add(_absolute(str(tmpdir)), 0, ["--bind", str(scratch), str(_absolute(str(tmpdir)))])
        if scratch is not None:
            # The scratch must not shadow what the turn runs: a worker installed
            # under /tmp (a checkout, a venv, node_modules) stays visible, read-only.
            for top in _under_scratch(argv, search_path):
                add(top, 2, ["--ro-bind", str(top), str(top)])
        git_writable, git_read_only = git_paths(cwd)
        for path in (cwd, *state_paths, *git_writable):
            path = _absolute(path)
            if path.exists():
                add(path, 0, ["--bind", str(path), str(path)])
        for path in git_read_only:
            add(path, 2, ["--ro-bind", str(path), str(path)])
        for path in hidden:
            # A directory becomes an empty tmpfs (made read-only below); a file reads as empty.
            add(path, 1, ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)])
        for path in self.read_only:
            if path.exists():
                add(path, 2, ["--ro-bind", str(path), str(path)])
        mounts.sort(key=lambda m: (m[0], m[1]))

        args: list[str] = [
            str(self.executable),
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--cap-drop", "ALL",
            "--die-with-parent",
        ]  # fmt: skip
        if self.uid == 0:
            args += ["--uid", str(NOBODY), "--gid", str(NOBODY)]
        for _, _, mount in mounts:
            args += mount
        # The hidden tmpfs become read-only once everything inside them is mounted.
        for path in hidden:
            if path.is_dir():
                args += ["--remount-ro", str(path)]
        if scratch is not None and not moved_tmp:
            args += ["--setenv", "TMPDIR", SCRATCH_MOUNT]
        args += ["--chdir", str(cwd), "--", *argv]
        return args

    def wrapper_pids(self, leader: int) -> set[int]:
        """The bwrap processes of a turn whose group ``leader`` is bwrap: the leader and the
        namespace's init (its child running the same executable). Empty without a sandbox."""
        if not self.enabled:
            return set()
        import psutil

        try:
            proc = psutil.Process(leader)
            exe = proc.exe()
            found = {leader}
            for child in proc.children():
                try:
                    if child.exe() == exe:
                        found.add(child.pid)
                except psutil.Error:
                    continue
            return found
        except psutil.Error:
            return set()


def git_paths(cwd: Path) -> tuple[list[Path], list[Path]]:
    """The git repository around ``cwd``: what must be writable for commits to work
    (its git directory, and for a linked worktree the main repository's), and what
    stays read-only so a worker cannot plant code that runs later outside the
    sandbox (``hooks``, ``config``: ``core.hooksPath``, ``core.fsmonitor``...)."""
    for place in (cwd, *cwd.parents):
        dot_git = place / ".git"
        if dot_git.is_dir():
            dirs = [dot_git]
            break
        if dot_git.is_file():
            try:
                line = dot_git.read_text(errors="replace").strip()
            except OSError:
                return [], []
            if not line.startswith("gitdir:"):
                return [], []
            gitdir = _absolute(place / line.removeprefix("gitdir:").strip())
            common = gitdir
            try:
                common = _absolute(gitdir / (gitdir / "commondir").read_text().strip())
            except OSError:
                pass
            dirs = [gitdir, common]
            break
    else:
        return [], []
    read_only = [d / name for d in dirs for name in ("hooks", "config", "config.worktree") if (d / name).exists()]
    return dirs, read_only


def _absolute(path: Path | str) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def state_paths(entries: Sequence[str], env: Mapping[str, str]) -> list[Path]:
    """A profile's ``state_dirs``: ``~`` is the server's home and ``$VAR``/``${VAR}`` come
    from the turn's environment (an entry naming an unset variable is skipped, so
    ``$CODEX_HOME`` counts only where it is set). A missing one without an extension
    (``~/.codex``) is created as a private directory so the worker can write there; a
    missing file (``~/.claude.json``) is left out until the CLI has one."""
    found = []
    for entry in entries:
        unset = False

        def value(match: re.Match[str]) -> str:
            nonlocal unset
            name = match.group(1) or match.group(2)
            if not env.get(name):
                unset = True
                return ""
            return env[name]

        expanded = _VARIABLE.sub(value, entry)
        if unset or not expanded:
            continue
        resolved = _absolute(expanded)
        if not resolved.exists() and not resolved.suffix:
            try:
                resolved.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                logger.warning("could not create the worker state directory %s: %s", resolved, exc)
        found.append(resolved)
    return found


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _under_scratch(argv: Sequence[str], search_path: str | None) -> set[Path]:
    """The top directories under the scratch mount that hold the turn's program, the
    files its command line names, or its ``$PATH`` entries (both as named and resolved).

    Only files count among the arguments: a directory named there is the turn's cwd
    or its like, and exposing its top would also show the host's view of the scratch
    beside it (Codex's own sandbox then tries to mount into that read-only copy)."""
    candidates: list[str] = [a for a in argv if os.path.isabs(a) and os.path.isfile(a)]
    if argv:
        found = shutil.which(argv[0], path=search_path)
        if found:
            candidates.append(found)
    return _tops(candidates) | _search_path_tops(search_path or "")


def _tops(names: Sequence[str]) -> set[Path]:
    mount = Path(SCRATCH_MOUNT)
    tops: set[Path] = set()
    for name in names:
        for path in {Path(os.path.abspath(name)), Path(os.path.realpath(name))}:
            if path.exists() and path.is_relative_to(mount) and len(path.parts) > len(mount.parts):
                tops.add(mount / path.parts[len(mount.parts)])
    return tops


#: $PATH resolved (realpath of each entry: a few ms) is reused this long.
_SEARCH_PATH_TTL_S = 10.0
_search_path_cache: dict[str, tuple[float, set[Path]]] = {}


def _search_path_tops(search_path: str) -> set[Path]:
    now = time.monotonic()
    cached = _search_path_cache.get(search_path)
    if cached is None or now - cached[0] > _SEARCH_PATH_TTL_S:
        if len(_search_path_cache) > 64:
            _search_path_cache.clear()
        cached = (now, _tops([d for d in search_path.split(os.pathsep) if os.path.isabs(d)]))
        _search_path_cache[search_path] = cached
    return set(cached[1])
