"""Worker profiles: how to run one turn of an agent CLI.

A profile is a command template (and a template to resume the worker's own
session), how the prompt is passed, and which event format the worker prints.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EventFormat = Literal["codex-jsonl", "claude-stream-json", "text"]

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_KNOWN_PLACEHOLDERS = {"cwd", "session", "prompt"}


class WorkerProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] = Field(min_length=1)
    # Runs the next turn of a session whose worker reported a session id.
    resume: list[str] | None = None
    prompt: Literal["stdin", "arg"] = "stdin"
    events: EventFormat = "text"
    max_concurrent: int = Field(default=4, ge=1, le=256)
    timeout_s: int = Field(default=3600, ge=1, le=86_400)
    env: dict[str, str] = Field(default_factory=dict)
    # The CLI's own state (sessions, settings, caches): writable inside
    # taskwarden's sandbox. ``~`` is the server's home; ``$VAR`` comes from
    # the turn's environment (skipped when unset).
    state_dirs: list[str] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _check_templates(self) -> WorkerProfile:
        for field in ("command", "resume"):
            template = getattr(self, field) or []
            for part in template:
                for name in _PLACEHOLDER.findall(part):
                    if name not in _KNOWN_PLACEHOLDERS:
                        raise ValueError(
                            f"{field}: unknown placeholder {{{name}}}; use {{cwd}}, {{session}} or {{prompt}}"
                        )
            if self.prompt == "arg" and template and not any("{prompt}" in p for p in template):
                raise ValueError(f"{field}: prompt = \"arg\" needs a {{prompt}} placeholder")
        if self.resume and not any("{session}" in p for p in self.resume):
            raise ValueError("resume: needs a {session} placeholder")
        return self

    def argv(self, *, cwd: str, prompt: str, session: str | None) -> list[str]:
        """The command for one turn: ``resume`` when there is a session to resume."""
        template = self.resume if (session and self.resume) else self.command
        values = {"cwd": cwd, "session": session or "", "prompt": prompt}
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], part) for part in template]


def merge_profile(base: WorkerProfile | None, override: dict[str, Any]) -> WorkerProfile:
    """A config-file profile: keys it sets replace the built-in's, the rest are kept."""
    data = base.model_dump() if base is not None else {}
    data.update(override)
    return WorkerProfile.model_validate(data)


BUILTIN_PROFILES: dict[str, WorkerProfile] = {
    "codex": WorkerProfile(
        command=["codex", "exec", "--json", "--skip-git-repo-check", "-C", "{cwd}", "-"],
        resume=["codex", "exec", "--json", "--skip-git-repo-check", "-C", "{cwd}", "resume", "{session}", "-"],
        prompt="stdin",
        events="codex-jsonl",
        state_dirs=["~/.codex", "$CODEX_HOME"],
    ),
    "claude": WorkerProfile(
        # stream-json in print mode needs --verbose; the prompt arrives on stdin.
        command=["claude", "-p", "--output-format", "stream-json", "--verbose"],
        resume=["claude", "-p", "--output-format", "stream-json", "--verbose", "--resume", "{session}"],
        prompt="stdin",
        events="claude-stream-json",
        state_dirs=["~/.claude", "~/.claude.json", "$CLAUDE_CONFIG_DIR"],
    ),
    # The prompt is a shell script; the session is its working directory, so
    # every turn simply runs in the same cwd.
    "shell": WorkerProfile(
        command=["/bin/sh", "-c", "{prompt}"],
        prompt="arg",
        events="text",
    ),
}
