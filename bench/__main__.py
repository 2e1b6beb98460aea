"""``python -m bench [--quick] [--out FILE] [--only NAME,...]``: run the benchmarks.

The last line of stdout is one JSON object with every metric (progress goes
to stderr). A full run rewrites docs/BENCHMARKS.md; ``--quick`` and ``--only``
only write a report when given ``--out``. The exit status is 1 when a measurement could
not be made, 0 otherwise — a missed target is a result, not a failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio

from bench import agent_cli, approval, cold_start, cross_instance, flood, guard_overhead, limits, memory, proxy_overhead, spawn, wake
from bench.core import Section, Sizes, progress
from bench.machine import ROOT, describe
from bench.report import render, write
from worker_server.server import watch_children_with_pidfds

# Cold start first, on a machine not yet busy with our own leftovers; the
# gigabyte flood last.
MODULES: dict[str, ModuleType] = {
    "cold_start": cold_start,
    "guard": guard_overhead,
    "proxy": proxy_overhead,
    "limits": limits,
    "wake": wake,
    "approval": approval,
    # Two daemons on PostgreSQL ($TASKWARDEN_TEST_PG; skipped without it outside CI).
    "cross_instance": cross_instance,
    "spawn": spawn,
    "agent_cli": agent_cli,
    "flood": flood,
    "memory": memory,
}
DEFAULT_REPORT = ROOT / "docs" / "BENCHMARKS.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with small sizes (seconds, not minutes)")
    parser.add_argument("--out", type=Path, help=f"write the report here (default for a full run: {DEFAULT_REPORT})")
    parser.add_argument("--only", help=f"comma-separated measurements to run: {', '.join(MODULES)}")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (databases, logs)")
    args = parser.parse_args(argv)

    names = list(MODULES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODULES]
        if unknown:
            parser.error(f"unknown measurement(s): {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    sizes = Sizes.smoke() if args.quick else Sizes.full()
    scratch = Path(tempfile.mkdtemp(prefix="taskwarden-bench-"))
    started = time.perf_counter()
    try:
        machine = describe(scratch)
        sections = anyio.run(_run_all, names, sizes, scratch)
    finally:
        _stop_daemons(scratch)
        if args.keep:
            progress(f"scratch kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - started

    # Only a full run of everything replaces the committed report.
    out = args.out or (None if args.quick or args.only else DEFAULT_REPORT)
    if out is not None:
        write(out, render(sections, machine, quick=args.quick, seconds=seconds))
        progress(f"report written to {out}")
    print(json.dumps(_summary(sections, sizes, seconds)), flush=True)
    return 1 if any(s.error for s in sections) else 0


def _stop_daemons(scratch: Path) -> None:
    """Stop now every daemon a measurement started (one per workspace database)."""
    from worker_server import forwarder

    for directory in scratch.rglob("*.daemon"):
        for sock in directory.glob("*.sock"):
            forwarder.request(directory, "stop", sock.stem, now=True)


async def _run_all(names: list[str], sizes: Sizes, scratch: Path) -> list[Section]:
    # The server reaps workers through pidfds on Python 3.11 (see
    # worker_server.server); the direct baseline in this process does the same.
    watch_children_with_pidfds()
    sections = []
    for name in names:
        module = MODULES[name]
        progress(f"{name}: {module.TITLE} ({'quick' if sizes.quick else 'full'})")
        started = time.perf_counter()
        try:
            section: Section = await module.run(sizes, scratch / name)
        except Exception:
            error = traceback.format_exc()
            progress(f"{name} FAILED:\n{error}")
            section = Section(name, module.TITLE, module.METHOD, error=error.strip())
        section.seconds = time.perf_counter() - started
        sections.append(section)
    return sections


def _summary(sections: list[Section], sizes: Sizes, seconds: float) -> dict[str, Any]:
    """The final JSON line: every metric by key, then what was missed."""
    summary: dict[str, Any] = {}
    missed: list[str] = []
    for section in sections:
        for m in section.metrics:
            summary[m.key] = m.value
            if m.met is False:
                missed.append(m.key)
    summary["targets_missed"] = missed
    summary["errors"] = [s.key for s in sections if s.error]
    summary["quick"] = sizes.quick
    summary["seconds"] = round(seconds, 1)
    return summary


if __name__ == "__main__":
    sys.exit(main())
