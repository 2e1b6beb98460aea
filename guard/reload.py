"""The live policy: the file given (or the built-in default), reloaded when it changes.

A change that does not load keeps the policy in force and logs why; counters
live in the database, so they survive both reloads and restarts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio

from guard.dialects import load_default_policy, load_policy
from guard.dialects.source import PolicyError
from guard.policy import Policy

logger = logging.getLogger(__name__)


class PolicySource:
    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path).expanduser().resolve() if path else None
        # A bad file at start-up is an error the operator must fix; only
        # later changes fall back to the policy already in force.
        self.policy: Policy = load_policy(self.path) if self.path else load_default_policy()
        self.last_error: str | None = None

    def reload(self) -> bool:
        """Read the file again; True if the new policy is now in force."""
        if self.path is None:
            return False
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self.last_error = str(exc)
            logger.error("policy reload failed, keeping the previous policy: %s", exc)
            return False
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror or exc}"
            logger.error("policy reload failed, keeping the previous policy: %s", self.last_error)
            return False
        self.policy = policy
        self.last_error = None
        logger.info(
            "policy reloaded from %s (%s, %d rules, default %s, mode %s)",
            self.path, policy.dialect, policy.rule_count, policy.default, policy.mode,
        )
        return True

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reload on every change to the file (editors that replace it included)."""
        if self.path is None:
            task_status.started()
            await anyio.sleep_forever()
        from watchfiles import awatch

        assert self.path is not None
        # Watch the directory: editors often replace the file rather than write it.
        started = False
        target = self.path

        def this_file(_change: object, path: str) -> bool:
            # Other files in the directory (a database beside the policy) are not ours.
            return Path(path).resolve() == target

        async for changes in awatch(self.path.parent, watch_filter=this_file, debounce=50, step=20,
                                    yield_on_timeout=True, rust_timeout=500):
            if not started:
                task_status.started()
                started = True
            if any(Path(p).resolve() == self.path for _, p in changes):
                self.reload()
