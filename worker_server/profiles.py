"""Worker profiles: how to run one turn of an agent CLI.

A profile is a command template (and a template to resume the worker's own
session), how the prompt is passed, and which event format the worker prints.
It also says which per-task options (``model``, ``effort``, ``sandbox``) the
worker takes and how each becomes arguments: they fill the ``{options}``
element of the templates, so every turn of a session runs with its options.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EventFormat = Literal["codex-jsonl", "claude-stream-json", "text"]

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_KNOWN_PLACEHOLDERS = {"cwd", "session", "prompt", "options"}
# A whole template element that expands to the task's option arguments (maybe none).
OPTIONS = "{options}"

Effort = Literal["low", "medium", "high"]
Sandbox = Literal["read-only", "workspace-write"]
EFFORTS: tuple[str, ...] = ("low", "medium", "high")
SANDBOXES: tuple[str, ...] = ("read-only", "workspace-write")
DEFAULT_SANDBOX = "workspace-write"


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
    # Per-task options this worker takes; each is the arguments it becomes
    # ({model} / {effort} fill in the value). None: the option is refused.
    model_args: list[str] | None = None
    effort_args: list[str] | None = None
    sandbox_args: dict[Sandbox, list[str]] | None = None
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
        for field in ("command", "resume"):
            for part in getattr(self, field) or []:
                if "{options}" in part and part != OPTIONS:
                    raise ValueError(f"{field}: {{options}} must be a whole element of the command")
        if self.supported_options() and OPTIONS not in self.command:
            raise ValueError("command: model_args/effort_args/sandbox_args need an {options} element")
        if self.sandbox_args is not None and set(self.sandbox_args) != set(SANDBOXES):
            raise ValueError(f"sandbox_args: give the arguments for each of {', '.join(SANDBOXES)}")
        return self

    def supported_options(self) -> list[str]:
        """The per-task options this profile takes."""
        declared = {"model": self.model_args, "effort": self.effort_args, "sandbox": self.sandbox_args}
        return [name for name, args in declared.items() if args is not None]

    def option_args(self, options: dict[str, str]) -> list[str]:
        """The arguments for a task's options (already checked against ``supported_options``).

        A profile with a sandbox gets its default one when the task chose none.
        """
        args: list[str] = []
        if options.get("model") and self.model_args is not None:
            args += [part.replace("{model}", options["model"]) for part in self.model_args]
        if options.get("effort") and self.effort_args is not None:
            args += [part.replace("{effort}", options["effort"]) for part in self.effort_args]
        if self.sandbox_args is not None:
            args += self.sandbox_args[options.get("sandbox") or DEFAULT_SANDBOX]  # type: ignore[index]
        return args

    def argv(
        self, *, cwd: str, prompt: str, session: str | None, options: dict[str, str] | None = None
    ) -> list[str]:
        """The command for one turn: ``resume`` when there is a session to resume."""
        template = self.resume if (session and self.resume) else self.command
        values = {"cwd": cwd, "session": session or "", "prompt": prompt}
        argv: list[str] = []
        for part in template:
            if part == OPTIONS:
                argv += self.option_args(options or {})
            else:
                argv.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], part))
        return argv


def merge_profile(base: WorkerProfile | None, override: dict[str, Any]) -> WorkerProfile:
    """A config-file profile: keys it sets replace the built-in's, the rest are kept."""
    data = base.model_dump() if base is not None else {}
    data.update(override)
    if OPTIONS not in data.get("command", []):
        # A command written without {options} takes none: the built-in's
        # option arguments would have nowhere to go.
        for key in ("model_args", "effort_args", "sandbox_args"):
            if key not in override:
                data[key] = None
    return WorkerProfile.model_validate(data)


BUILTIN_PROFILES: dict[str, WorkerProfile] = {
    # Tested with @openai/codex 0.171.0. `exec resume` takes -c and -m but not
    # --sandbox, so the sandbox is set as config (the same on every turn).
    # workspace-write: Codex's own sandbox lets the turn write inside cwd only.
    "codex": WorkerProfile(
        command=["codex", "exec", "--json", "--skip-git-repo-check", "-C", "{cwd}", OPTIONS, "-"],
        resume=["codex", "exec", "--json", "--skip-git-repo-check", "-C", "{cwd}", "resume", OPTIONS, "{session}", "-"],
        prompt="stdin",
        events="codex-jsonl",
        model_args=["-m", "{model}"],
        effort_args=["-c", 'model_reasoning_effort="{effort}"'],
        sandbox_args={
            "read-only": ["-c", 'sandbox_mode="read-only"'],
            "workspace-write": ["-c", 'sandbox_mode="workspace-write"'],
        },
        state_dirs=["~/.codex", "$CODEX_HOME"],
    ),
    # Tested with @anthropic-ai/claude-code 2.1.332. acceptEdits lets edits
    # (and shell output) inside cwd through and refuses any outside it; manual
    # refuses every write in print mode. Never bypassPermissions.
    "claude": WorkerProfile(
        # stream-json in print mode needs --verbose; the prompt arrives on stdin.
        command=["claude", "-p", "--output-format", "stream-json", "--verbose", OPTIONS],
        resume=["claude", "-p", "--output-format", "stream-json", "--verbose", OPTIONS, "--resume", "{session}"],
        prompt="stdin",
        events="claude-stream-json",
        model_args=["--model", "{model}"],
        effort_args=["--effort", "{effort}"],
        sandbox_args={
            "read-only": ["--permission-mode", "manual"],
            "workspace-write": ["--permission-mode", "acceptEdits"],
        },
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
