"""The live policy: the file given (or the built-in default), reloaded when it changes.

A reload fails closed. A change takes effect only when

1. the file has stopped changing: its size, modification time and inode are
   the same ``STABLE_S`` apart (a writer mid-way through is not read);
2. it parses into a policy (an invalid change keeps the policy in force);
3. if it was written in place (the same inode as the file in force), it
   does not look half-written. A writer that rewrites the file in place and
   pauses longer than ``STABLE_S`` leaves a prefix on disk, and the prefix
   of a policy is often a valid, wider one (``version: "1"`` alone allows
   everything). So a text that is the beginning of the text in force is
   refused, and so is a *hollow* policy — no rules, nothing hidden,
   ``default: allow`` — replacing one that is not. To allow everything on
   purpose, say so with a rule (``"*": {rules: [{action: allow}]}``).

A file renamed into place (a new inode) is complete by construction and is
taken as written. That is the way to change a policy that holds whatever
a writer does: write a temporary file beside it and rename it over the old
one (what ``mv``, most editors and configuration tools do). In place, a
writer that pauses after a prefix which is itself a different, non-hollow
and wider policy cannot be told from a finished one. Counters live in the
database, so they survive both reloads and restarts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anyio

from guard.dialects import load_default_policy, parse_policy
from guard.dialects.source import PolicyError
from guard.policy import Policy

logger = logging.getLogger(__name__)

# How long the file must stay unchanged before it is read.
STABLE_S = 0.3
# Give up waiting for a file that never settles after this long (it is
# read on its next change instead).
SETTLE_LIMIT_S = 30.0


class PolicyRefused(PolicyError):
    """A file that parses but is not taken: it looks half-written."""


def is_hollow(policy: Policy) -> bool:
    """No rules, nothing hidden and ``default: allow``: it allows every call."""
    return policy.rule_count == 0 and not policy.hide and policy.default == "allow"


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class PolicySource:
    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path).expanduser().resolve() if path else None
        # A bad file at start-up is an error the operator must fix; only
        # later changes fall back to the policy already in force.
        self.text: str | None = None
        self.inode: int | None = None
        if self.path is not None:
            signature = _signature(self.path)
            self.text = self._read()
            self.inode = signature[0] if signature else None
            self.policy: Policy = parse_policy(self.text, str(self.path))
        else:
            self.policy = load_default_policy()
        self.last_error: str | None = None

    def _read(self) -> str:
        assert self.path is not None
        try:
            return self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"not UTF-8 text: {exc.reason}", source=str(self.path)) from exc
        except OSError as exc:
            raise PolicyError(f"cannot read the file: {exc.strerror or exc}", source=str(self.path)) from exc

    def check_change(self, text: str, *, in_place: bool = True) -> Policy:
        """The policy ``text`` would put in force; ``PolicyError`` if it must not be.

        ``in_place``: the file was rewritten rather than renamed into place,
        so it may be half-written.
        """
        assert self.path is not None
        source = str(self.path)
        if not in_place:
            return parse_policy(text, source)
        if self.text is not None and text != self.text and self.text.startswith(text):
            raise PolicyRefused(
                "the file is the beginning of the policy in force, as if a writer stopped part-way; "
                "not applied (write policy files atomically: a temporary file, then rename)",
                source=source,
            )
        policy = parse_policy(text, source)
        if is_hollow(policy) and not is_hollow(self.policy):
            raise PolicyRefused(
                "the file has no rules, hides nothing and allows every call, replacing a policy that "
                "has rules: it looks half-written, so it is not applied. To allow everything on "
                'purpose, say so with a rule: tools: {"*": {rules: [{action: allow}]}}',
                source=source,
            )
        return policy

    def reload(self) -> bool:
        """Read the file again; True if a new policy is now in force."""
        if self.path is None:
            return False
        signature = _signature(self.path)
        try:
            text = self._read()
            if text == self.text:
                return False
            in_place = signature is not None and signature[0] == self.inode
            policy = self.check_change(text, in_place=in_place)
        except PolicyError as exc:
            self.last_error = str(exc)
            logger.error("policy reload failed, keeping the previous policy: %s", exc)
            return False
        self.policy = policy
        self.text = text
        self.inode = signature[0] if signature else None
        self.last_error = None
        logger.info(
            "policy reloaded from %s (%s, %d rules, default %s, mode %s)",
            self.path, policy.dialect, policy.rule_count, policy.default, policy.mode,
        )
        return True

    async def wait_until_stable(self) -> None:
        """Return once the file has not changed for ``STABLE_S`` (or after ``SETTLE_LIMIT_S``)."""
        assert self.path is not None
        with anyio.move_on_after(SETTLE_LIMIT_S):
            before = _signature(self.path)
            while True:
                await anyio.sleep(STABLE_S)
                now = _signature(self.path)
                if now == before:
                    return
                before = now
        logger.warning("policy file %s kept changing for %.0f s; reading it as it is", self.path, SETTLE_LIMIT_S)

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

        async for changes in awatch(self.path.parent, watch_filter=this_file, debounce=1600, step=50,
                                    yield_on_timeout=True, rust_timeout=500):
            if not started:
                task_status.started()
                started = True
            if any(Path(p).resolve() == self.path for _, p in changes):
                await self.wait_until_stable()
                self.reload()

