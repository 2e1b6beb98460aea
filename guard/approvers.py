"""Who may decide an approval: people's roles, a rule's approvers, its quorum.

People have one of three roles, each including the ones before it:

- ``worker``   — claims and works on human tasks;
- ``approver`` — and decides approvals;
- ``admin``    — and manages people.

A ``require_approval`` rule may name its ``approvers`` (people's names or
role names) and a ``quorum``; without approvers, any approver or admin may
decide. ``escalate_to`` (names or roles) are told when nobody decided within
``escalate_after_s`` and may decide too. The guard knows nothing of where
people are stored: whoever decides passes the decider's role (``None`` for
the operator at the terminal, a name that is no registered person: whoever
can open the database file could change it anyway).
"""

from __future__ import annotations

from collections.abc import Iterable

ROLES: tuple[str, ...] = ("worker", "approver", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}


def is_role(name: str) -> bool:
    return name in _RANK


def has_role(role: str, needed: str) -> bool:
    """Whether a person with ``role`` counts as ``needed`` (roles include the lesser ones)."""
    return _RANK.get(role, -1) >= _RANK[needed]


def may_decide(
    approvers: Iterable[str] | None, escalate_to: Iterable[str], name: str, role: str | None
) -> bool:
    """Whether ``name`` (with ``role``; ``None``: the operator) may decide an approval."""
    if role is None:
        return True
    entries = list(approvers) if approvers else ["approver"]
    entries += list(escalate_to)
    lowered = name.strip().casefold()
    for entry in entries:
        if is_role(entry):
            if has_role(role, entry) and has_role(role, "approver"):
                return True
        elif entry.casefold() == lowered and has_role(role, "worker"):
            # A person named by the rule decides whatever their role: the
            # operator chose them for this call.
            return True
    return False


def describe(approvers: Iterable[str] | None, quorum: int) -> str:
    """``2 of: alice, bob, approver`` / ``1 of: any approver``."""
    who = ", ".join(approvers) if approvers else "any approver"
    return f"{quorum} of: {who}"
