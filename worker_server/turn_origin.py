"""Is a request coming from inside a worker turn? (defence in depth for approvals)

Only a person may decide an approval. The sandbox already hides the database
from every turn; on top of that, a decision is refused when the process asking
for it descends from a turn: a turn's processes carry ``TASKWARDEN_TASK_ID``
and a sandboxed turn's PID namespace is led by a bwrap process that carries it
too, so an orphaned or environment-scrubbed descendant still finds it among
its ancestors. Without the sandbox (``sandbox_backend = "none"``) a
descendant that detaches (double fork, ``setsid``) and scrubs its
environment escapes this check: that backend promises nothing.
"""

from __future__ import annotations

import ipaddress
import logging

import psutil

from worker_server.process_group import MARKER_ENV

logger = logging.getLogger(__name__)


def enclosing_turn(pid: int | None = None) -> str | None:
    """The task id of the turn whose process tree ``pid`` (default: this process) is in, or None."""
    try:
        proc = psutil.Process(pid)
        lineage = [proc, *proc.parents()]
    except psutil.Error:
        return None
    for member in lineage:
        try:
            task_id = member.environ().get(MARKER_ENV)
        except (psutil.Error, OSError):
            continue  # another user's process: not one of our turns
        if task_id:
            return task_id
    return None


def peer_turn(client: tuple[str, int] | None, server: tuple[str, int] | None) -> str | None:
    """For a TCP request from this machine, the turn of the process that sent it, or None.

    The peer is found by its socket (client port to server port) among this
    machine's connections; a remote peer, or one this user cannot see, is None.
    """
    if client is None or server is None:
        return None
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack listener
    if not (mapped or address).is_loopback:
        return None
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        logger.warning("cannot list this machine's connections to check who decides an approval")
        return None
    for conn in connections:
        if conn.pid and conn.laddr and conn.raddr and conn.laddr.port == client[1] and conn.raddr.port == server[1]:
            return enclosing_turn(conn.pid)
    return None


def refusal(task_id: str) -> str:
    return (
        f"refused: this request comes from inside the worker turn of task {task_id}. Only a person decides "
        "approvals and acts for people, from a terminal or the inbox outside any worker."
    )
