"""The machine a run measured, read at run time (numbers mean little without it)."""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from importlib import metadata
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def describe(scratch: Path) -> list[tuple[str, str]]:
    """``(label, value)`` rows for the report."""
    vm = psutil.virtual_memory()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("CPU", _cpu_model()),
        ("cores", f"{os.cpu_count()} logical, {psutil.cpu_count(logical=False) or '?'} physical"),
        ("RAM", f"{vm.total / (1 << 30):.1f} GiB ({vm.available / (1 << 30):.1f} GiB available at start)"),
        ("virtualised", "yes (hypervisor CPU flag)" if _hypervisor() else "no"),
        ("OS", f"{_os_name()}, kernel {platform.release()} ({platform.machine()})"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("SQLite", sqlite3.sqlite_version),
        ("mcp SDK", _version("mcp")),
        ("scratch filesystem", _filesystem(scratch)),
        ("load average at start", f"{load} (1, 5, 15 min)"),
        ("taskwarden", f"{_version('taskwarden')}, {_commit()}"),
    ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _hypervisor() -> bool:
    try:
        return " hypervisor" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.version()}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _filesystem(path: Path) -> str:
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    return f"{best.fstype} at {best.mountpoint}" if best else "unknown"


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {sha}" + (" with uncommitted changes" if dirty else "")
