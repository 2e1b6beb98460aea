"""Finding and ending every process a worker turn started.

Each turn runs as the leader of its own process group and carries
``TASKWARDEN_TASK_ID`` in its environment. Killing the group ends the worker
and its children; the marker also finds descendants that left the group
(``setsid``) and lets a restarted server tell a leftover group from an
unrelated process that reused the number.
"""

from __future__ import annotations

import logging
import os
import signal

import anyio
import psutil

logger = logging.getLogger(__name__)

MARKER_ENV = "TASKWARDEN_TASK_ID"

#: How long a worker gets between SIGTERM and SIGKILL.
GRACE_S = 5.0


def _marked(proc: psutil.Process, task_id: str) -> bool:
    try:
        return proc.environ().get(MARKER_ENV) == task_id
    except (psutil.Error, OSError):
        return False


def task_processes(task_id: str, pgid: int | None) -> list[psutil.Process]:
    """Live (non-zombie) processes belonging to a task's turn."""
    me = os.getpid()
    grouped: list[psutil.Process] = []
    marked: list[psutil.Process] = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            in_group = pgid is not None and os.getpgid(proc.pid) == pgid
        except (psutil.Error, OSError):
            continue
        if in_group:
            grouped.append(proc)
        elif _marked(proc, task_id):
            marked.append(proc)
    # A live group's id is never reused, but a dead one's may be: only treat
    # the group as ours if one of its members carries our marker.
    if grouped and not any(_marked(p, task_id) for p in grouped):
        grouped = []
    return grouped + marked


def _signal_all(procs: list[psutil.Process], pgid: int | None, sig: signal.Signals) -> None:
    if pgid is not None and procs:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.Error, OSError):
            pass


async def _wait_gone(task_id: str, pgid: int | None, timeout: float) -> list[psutil.Process]:
    # A short, bounded check while a group shuts down; not a wait for task state.
    with anyio.move_on_after(timeout):
        while True:
            remaining = await anyio.to_thread.run_sync(task_processes, task_id, pgid)
            if not remaining:
                return []
            await anyio.sleep(0.05)
    return await anyio.to_thread.run_sync(task_processes, task_id, pgid)


async def terminate(task_id: str, pgid: int | None, grace_s: float = GRACE_S) -> bool:
    """SIGTERM the turn's processes, wait ``grace_s``, SIGKILL what is left.

    Returns True when something had to be signalled.
    """
    procs = await anyio.to_thread.run_sync(task_processes, task_id, pgid)
    if not procs:
        return False
    logger.info("stopping task %s: %d process(es)", task_id, len(procs))
    _signal_all(procs, pgid, signal.SIGTERM)
    remaining = await _wait_gone(task_id, pgid, grace_s)
    if remaining:
        logger.warning("task %s: %d process(es) ignored SIGTERM; killing", task_id, len(remaining))
        _signal_all(remaining, pgid, signal.SIGKILL)
        remaining = await _wait_gone(task_id, pgid, 2.0)
        if remaining:
            logger.error("task %s: processes survive SIGKILL: %s", task_id, [p.pid for p in remaining])
    return True
