"""Which worker profiles this machine can run: is each CLI installed, and its version.

The default worker, when the config names none, is the first agent CLI found
(``codex``, then ``claude``); ``spawn-task`` refuses a worker whose program
is missing instead of accepting a turn that cannot start; ``taskwarden
workers`` prints the table; agents read the same facts in ``spawn-task``'s
description.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TextIO

from worker_server.profiles import WorkerProfile

if TYPE_CHECKING:
    from worker_server.config import Settings

#: Agent CLIs tried, in order, for the default worker when the config names none.
PREFERRED = ("codex", "claude")
#: The worker used when no agent CLI is installed (its prompts are shell scripts).
FALLBACK = "shell"
VERSION_TIMEOUT_S = 5.0


def find_program(profile: WorkerProfile) -> str | None:
    """The executable a turn of ``profile`` would start, or None when it is not there."""
    program = profile.command[0]
    if os.sep in program:
        return program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    # The PATH the worker will start with.
    return shutil.which(program, path=profile.env.get("PATH", os.environ.get("PATH")))


def pick_default(profiles: Mapping[str, WorkerProfile]) -> tuple[str, str]:
    """``(worker, why)``: the first installed agent CLI, else the shell worker."""
    for name in PREFERRED:
        profile = profiles.get(name)
        if profile is not None and find_program(profile) is not None:
            return name, f"default worker: {name} (found {find_program(profile)})"
    missing = [n for n in PREFERRED if n in profiles]
    what = f"{' and '.join(missing)} {'are' if len(missing) > 1 else 'is'}" if missing else "no agent CLI is"
    return FALLBACK, (
        f"default worker: {FALLBACK}, because {what} not installed: a prompt spawned without a worker runs "
        "as a shell script. Install Codex or Claude Code, or set default_worker in the config"
    )


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    program: str
    path: str | None
    version: str | None
    max_concurrent: int
    timeout_s: int
    options: list[str]
    default: bool


def version_of(path: str) -> str | None:
    """The first line ``PATH --version`` prints, or None."""
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0][:120] if done.returncode == 0 and text else None


def describe(settings: Settings, *, versions: bool = True) -> list[WorkerInfo]:
    infos = []
    for name, profile in sorted(settings.profiles().items()):
        path = find_program(profile)
        # A shell's --version is not the worker's; only agent CLIs are asked.
        version = version_of(path) if versions and path and profile.events != "text" else None
        infos.append(
            WorkerInfo(
                name=name, program=profile.command[0], path=path, version=version,
                max_concurrent=profile.max_concurrent, timeout_s=profile.timeout_s,
                options=profile.supported_options(), default=name == settings.default_worker,
            )
        )  # fmt: skip
    return infos


def summary_for_agents(settings: Settings) -> str:
    """One sentence for spawn-task's description: what may be spawned here."""
    profiles = settings.profiles()
    found = [n for n, p in sorted(profiles.items()) if find_program(p) is not None]
    missing = [n for n in sorted(profiles) if n not in found]
    text = f"On this server: {', '.join([*found, 'human'])}"
    if missing:
        text += f" (not installed: {', '.join(missing)})"
    return text + f". Default: {settings.default_worker}."


def print_workers(settings: Settings, *, as_json: bool, out: TextIO) -> int:
    infos = describe(settings)
    if as_json:
        out.write(json.dumps([asdict(i) for i in infos], indent=2) + "\n")
        return 0
    out.write(f"{'WORKER':<12} {'INSTALLED':<10} {'VERSION':<24} {'SLOTS':>5} {'TIMEOUT':>8}  PROGRAM\n")
    for i in infos:
        name = i.name + (" *" if i.default else "")
        where = i.path or f"{i.program} (not found on PATH)"
        out.write(
            f"{name:<12} {'yes' if i.path else 'NO':<10} {(i.version or '-')[:24]:<24} {i.max_concurrent:>5} "
            f"{i.timeout_s:>7}s  {where}\n"
        )
    out.write(f"{'human':<12} {'-':<10} {'-':<24} {'-':>5} {'-':>8}  the inbox (taskwarden humans add NAME)\n")
    out.write(f"* {settings.default_worker_note or 'default worker: default_worker in the config'}\n")
    return 0
