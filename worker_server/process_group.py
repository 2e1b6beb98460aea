"""Finding and ending every process a worker turn started.

Each turn runs as the leader of its own process group and carries
``TASKWARDEN_TASK_ID`` in its environment. Killing the group ends the worker
and its children; the marker also finds descendants that left the group
(``setsid``) and lets a restarted server tell a leftover group from an
unrelated process that reused the number. The daemon is a child subreaper
(``become_subreaper``): a descendant that leaves the group and cleans its
environment (``setsid``, a double fork, ``env -i``) is re-parented to the
daemon instead of init, so it is still found — a child of ours that the
turn's period started and that no other running turn owns.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import secrets
import signal
from collections.abc import Set as AbstractSet
from collections.abc import Collection

import anyio
import psutil

logger = logging.getLogger(__name__)

MARKER_ENV = "TASKWARDEN_TASK_ID"
#: Set (to a value workers never see) on the helpers the server itself runs
#: (git), which are children of ours like a turn's adopted escapees.
HELPER_ENV = "TASKWARDEN_HELPER"
_HELPER_TOKEN = secrets.token_hex(16)

#: How long a worker gets between SIGTERM and SIGKILL.
GRACE_S = 5.0

_PR_SET_CHILD_SUBREAPER = 36
_subreaper = False
#: Children of ours seen as zombies in the last sweep (see reap_adopted).
_zombies: set[int] = set()


def become_subreaper() -> bool:
    """Make orphaned descendants children of this process rather than of init (Linux)."""
    global _subreaper
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        _subreaper = False
    if not _subreaper:
        logger.warning("could not become a child subreaper; escaped descendants are found by their marker only")
    return _subreaper


def helper_env() -> dict[str, str]:
    """Environment that marks a process as the server's own helper, never a turn's escapee."""
    return {HELPER_ENV: _HELPER_TOKEN}


def reap_adopted() -> None:
    """Reap adopted descendants that have exited.

    Nobody else waits for them. A zombie child is reaped only when it was
    already a zombie at the previous sweep: our own subprocesses are reaped
    by their owner (asyncio, subprocess) at once, so a lingering one is adopted.
    """
    global _zombies
    if not _subreaper:
        return
    now: set[int] = set()
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                now.add(child.pid)
        except psutil.Error:
            continue
    for pid in now & _zombies:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    _zombies = now - _zombies


def _marked(proc: psutil.Process, task_id: str) -> bool:
    try:
        return proc.environ().get(MARKER_ENV) == task_id
    except (psutil.Error, OSError):
        return False


def task_processes(
    task_id: str,
    pgid: int | None,
    *,
    group_is_ours: bool = False,
    not_before: float | None = None,
    spare: Collection[int] = (),
) -> tuple[list[psutil.Process], bool]:
    """Live (non-zombie) processes of a task's turn, and whether ``pgid`` is verified ours.

    A live group's id is never reused, so the group is ours when the caller
    knows it (``group_is_ours``: the runner that started it), when a member
    carries our marker, or when a member started after the turn did
    (``not_before``) — a descendant may have cleaned its environment.
    Outside the group, only processes newer than ``not_before`` are looked at.
    As subreaper, children of ours newer than the turn are its escapees, and
    so are their descendants, unless they are the workers (``spare``) of
    other turns or carry another turn's marker.
    """
    me = os.getpid()
    grouped: list[psutil.Process] = []
    marked: list[psutil.Process] = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            in_group = pgid is not None and os.getpgid(proc.pid) == pgid
            # Anything the turn started was created after it began; psutil
            # caches create_time, so older processes cost no further reads.
            if not in_group and not_before is not None and not _started_after(proc, not_before):
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.Error, OSError):
            continue
        if in_group:
            grouped.append(proc)
        elif _marked(proc, task_id):
            marked.append(proc)
        elif _subreaper and not_before is not None and _adopted(proc, me, task_id, spare):
            marked.append(proc)
            marked.extend(_live_descendants(proc))
    verified = bool(grouped) and (
        group_is_ours
        or any(_marked(p, task_id) for p in grouped)
        or (not_before is not None and any(_started_after(p, not_before) for p in grouped))
    )
    found = (grouped if verified else []) + marked
    # Whatever they started is the turn's too, wherever it went (setsid, env -i).
    pids = {p.pid for p in found}
    for proc in list(found):
        for child in _live_descendants(proc):
            if child.pid not in pids and child.pid not in spare:
                pids.add(child.pid)
                found.append(child)
    return found, verified


def _adopted(proc: psutil.Process, me: int, task_id: str, spare: Collection[int]) -> bool:
    try:
        if proc.ppid() != me or proc.pid in spare:
            return False
        environ = proc.environ()
        if MARKER_ENV not in environ:
            # A fork of ours not yet (or just being) exec'd: another turn's
            # worker or a helper being started, not an escapee. Read again in
            # case it exec'd in between.
            cmdline = proc.cmdline()
            if not cmdline or cmdline == _own_cmdline():
                return False
            environ = proc.environ()
        if environ.get(HELPER_ENV) == _HELPER_TOKEN:
            return False  # a helper this daemon runs (git), not a turn's
        other = environ.get(MARKER_ENV)
    except (psutil.Error, OSError):
        return False
    return other is None or other == task_id


@functools.cache
def _own_cmdline() -> list[str]:
    return psutil.Process().cmdline()


def _live_descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        return []
    live = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                live.append(child)
        except psutil.Error:
            continue
    return live


def _started_after(proc: psutil.Process, when: float) -> bool:
    try:
        return proc.create_time() >= when - 1.0  # create_time has clock-tick resolution
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.name()}"
    except psutil.Error:
        return str(proc.pid)


def _signal_all(
    procs: list[psutil.Process], pgid: int | None, group: bool, sig: signal.Signals, spare: AbstractSet[int] = frozenset()
) -> None:
    if group and pgid is not None and not spare:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs:
        if proc.pid in spare:
            continue
        try:
            proc.send_signal(sig)
        except (psutil.Error, OSError):
            pass


async def _wait_gone(task_id: str, pgid: int | None, timeout: float, **how: object) -> list[psutil.Process]:
    # A short, bounded check while a group shuts down; not a wait for task state.
    with anyio.move_on_after(timeout):
        while True:
            remaining, _ = await anyio.to_thread.run_sync(lambda: task_processes(task_id, pgid, **how))
            if not remaining:
                return []
            await anyio.sleep(0.05)
    return (await anyio.to_thread.run_sync(lambda: task_processes(task_id, pgid, **how)))[0]


async def terminate(
    task_id: str,
    pgid: int | None,
    grace_s: float = GRACE_S,
    *,
    group_is_ours: bool = False,
    not_before: float | None = None,
    spare_gentle: AbstractSet[int] = frozenset(),
    spare: Collection[int] = (),
) -> bool:
    """SIGTERM the turn's processes, wait ``grace_s``, SIGKILL what is left.

    ``spare_gentle``: processes that get only the SIGKILL (a sandbox wrapper
    that would end its whole sandbox on SIGTERM, cutting the grace short).
    ``spare``: other turns' worker processes, never counted as this turn's.
    Returns True when something had to be signalled.
    """
    how = {"group_is_ours": group_is_ours, "not_before": not_before, "spare": spare}
    procs, group = await anyio.to_thread.run_sync(lambda: task_processes(task_id, pgid, **how))
    if not procs:
        return False
    logger.info("stopping task %s: %d process(es): %s", task_id, len(procs), ", ".join(_describe(p) for p in procs))
    _signal_all(procs, pgid, group, signal.SIGTERM, spare_gentle)
    remaining = await _wait_gone(task_id, pgid, grace_s, **how)
    if remaining:
        logger.warning("task %s: %d process(es) ignored SIGTERM; killing", task_id, len(remaining))
        _signal_all(remaining, pgid, group, signal.SIGKILL)
        remaining = await _wait_gone(task_id, pgid, 2.0, **how)
        if remaining:
            logger.error("task %s: processes survive SIGKILL: %s", task_id, [p.pid for p in remaining])
    return True
