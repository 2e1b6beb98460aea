"""The guard against a hostile agent, through real server processes and real MCP clients.

Each test here stands for a finding of the adversarial pass (issue 11) and
fails on the code that had it: an argument that froze every client, secrets
that reached the database files, a prompt auto-answered by the agent's own
client.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from tests import hostile_client
from tests.support import ROOT, Workspace, call, http_server

pytestmark = pytest.mark.anyio

# The catastrophic pattern from the adversarial pass: Python's backtracking
# re needs ~2^n steps for n word characters followed by one that is not.
CATASTROPHIC = r"^(\w+\s?)+$"
FREEZE_POLICY = f"""\
default: allow
tools:
  spawn-task:
    rules:
      - action: deny
        reason: "titles are plain words"
        conditions:
          - {{path: args.title, op: not_regex, value: '{CATASTROPHIC}'}}
"""
HUGE = hostile_client.HUGE


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def list_latencies(client: Client, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call(client, "list-tasks", {"limit": 5})
        samples.append(time.perf_counter() - started)
    return samples


async def measure_beside(base: str, victim: Client, stop: Path, *mode: str) -> tuple[float, dict[str, int]]:
    """The victim's list-tasks p99 while another client process runs ``tests.hostile_client``."""
    other = subprocess.Popen(
        [sys.executable, "-m", "tests.hostile_client", f"{base}/mcp", str(stop), *mode],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert other.stderr is not None
        ready = await anyio.to_thread.run_sync(other.stderr.readline)
        assert "ready" in ready, ready
        await anyio.sleep(0.3)  # its first calls are in flight
        latency = p99(await list_latencies(victim, 100))
    finally:
        stop.touch()
        out, err = await anyio.to_thread.run_sync(lambda: other.communicate(timeout=180))
    assert other.returncode == 0, err
    return latency, json.loads(out)


async def test_no_argument_or_policy_regex_stalls_another_client(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(FREEZE_POLICY)
    ws = Workspace(tmp_path, policy=policy)
    ratios = []
    with anyio.fail_after(300):  # the old code stalled 95 s on one such call
        async with http_server(ws, "--allow-anonymous", "--no-inbox") as base:
            async with Client(f"{base}/mcp") as victim:
                await list_latencies(victim, 10)  # warm up
                # The baseline is the same calls at the same pace with ordinary
                # arguments, so the ratio is the cost of hostile arguments, not
                # of sharing two cores. Noise is real: up to three rounds.
                for round_ in range(3):
                    baseline, _ = await measure_beside(base, victim, tmp_path / f"calm-{round_}", "--benign")
                    attacked, refused = await measure_beside(base, victim, tmp_path / f"stop-{round_}")
                    assert set(refused) == {
                        "huge title: invalid_arguments",
                        "unknown tool: Unknown tool: no-such-tool",
                        "catastrophic regex: policy_denied",
                    }, refused
                    ratios.append(attacked / baseline)
                    print(f"list-tasks p99: baseline {baseline * 1000:.1f} ms, under attack "
                          f"{attacked * 1000:.1f} ms, ratio {ratios[-1]:.2f}; attacker calls {refused}",
                          file=sys.stderr)
                    if ratios[-1] <= 2.0:
                        break
    assert min(ratios) <= 2.0, f"another client's p99 grew {min(ratios):.1f}x under attack (rounds: {ratios})"
    # The refusals were audited, with what was sent cut to a bounded size.
    audit = [json.loads(line) for line in ws.cli("audit", "--json").stdout.splitlines() if line.strip()]
    unknown = next(r for r in audit if r["tool"] == "no-such-tool")
    assert unknown["args"]["token"] == "[REDACTED]"
    assert len(json.dumps(unknown["args"])) < 20_000
    invalid = next(r for r in audit if r["decision"] == "invalid_arguments")
    assert "sk-sk-" not in json.dumps(invalid["args"])
    assert len(invalid["reason"]) < 300


def test_policy_check_rejects_a_pattern_re2_cannot_run(tmp_path: Path) -> None:
    bad = tmp_path / "lookbehind.yaml"
    bad.write_text(
        "default: allow\ntools:\n  spawn-task:\n    rules:\n      - action: deny\n        conditions:\n"
        "          - {path: args.title, op: regex, value: '(?<=x)y'}\n"
    )
    out = Workspace(tmp_path).cli("policy", "check", str(bad), check=False)
    assert out.returncode == 1
    message = out.stdout + out.stderr
    assert f"{bad}:7: tools.spawn-task.rules[0].conditions[0].value" in message
    assert "RE2" in message and "(?<=x)y" in message
    # The catastrophic pattern is fine for RE2: it is linear whatever the input.
    good = tmp_path / "catastrophic.yaml"
    good.write_text(FREEZE_POLICY)
    assert Workspace(tmp_path).cli("policy", "check", str(good)).stdout.startswith("OK")
