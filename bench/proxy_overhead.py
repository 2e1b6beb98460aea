"""What `taskwarden guard` costs in front of another MCP server: calls/s through it ÷ direct."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from mcp import Client
from mcp.client.stdio import StdioServerParameters

from bench.core import Metric, Section, Sizes, fmt, median, percentile, progress, rounded
from bench.machine import ROOT

TITLE = "`taskwarden guard` overhead in front of another MCP server (stdio)"
METHOD = """\
The upstream is `@modelcontextprotocol/server-everything` (the pinned npm
package in tests/js, on Node 22) and the cheap read-only tool its `echo`
(annotated `readOnlyHint: true`). Two SDK clients over stdio, open side by
side in one run: one to `mcp-server-everything` directly, one to
`taskwarden guard --policy P -- mcp-server-everything` (its own copy of the
server), where P allows `echo` (no limit). Both are connected with the
handshake-era session (`mode="legacy"`), as stdio clients connect today.
Batches of sequential `echo` calls alternate direct / guarded in ABBA
order after a warm-up; the ratio is the median over pairs of (calls/s
through the guard) ÷ (calls/s direct), each pair measured back to back.
Through the guard every call is decided (policy, argument schema checked
against the upstream's input schema) and audited (a read-only tool's row is
queued for the batching writer) before and after it is forwarded over a
second JSON-RPC hop."""

POLICY = """\
version: "1"
default: deny
tools:
  echo:
    rules:
      - action: allow
"""


def _everything() -> list[str]:
    bin_dir = ROOT / "tests" / "js" / "node_modules" / ".bin"
    node, server = bin_dir / "node", bin_dir / "mcp-server-everything"
    if not server.exists():
        raise RuntimeError(f"{server} is missing: npm ci --prefix {ROOT / 'tests' / 'js'}")
    return [str(node), str(server)]


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("proxy", TITLE, METHOD)
    # The policy in its own directory, the database in another, as users keep
    # them (a project's policy; ~/.local/state): the policy watcher sees no audit writes.
    (scratch / "policy").mkdir(parents=True, exist_ok=True)
    (scratch / "state").mkdir(parents=True, exist_ok=True)
    policy = scratch / "policy" / "policy.yaml"
    policy.write_text(POLICY)
    upstream = _everything()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKWARDEN_")}
    direct = StdioServerParameters(command=upstream[0], args=upstream[1:], env=env, cwd=str(scratch))
    guarded = StdioServerParameters(
        command=sys.executable,
        args=["-m", "worker_server", "guard", "--db", str(scratch / "state" / "guard.db"), "--policy", str(policy),
              "--", *upstream],
        env=env,
        cwd=str(scratch),
    )
    rates: dict[str, list[float]] = {"direct": [], "guard": []}
    lat: dict[str, list[float]] = {"direct": [], "guard": []}
    pairs: list[float] = []
    async with Client(direct, mode="legacy") as plain, Client(guarded, mode="legacy") as through:
        clients = {"direct": plain, "guard": through}

        async def batch(side: str, n: int) -> float:
            client = clients[side]
            start = time.perf_counter()
            for i in range(n):
                t = time.perf_counter()
                result = await client.call_tool("echo", {"message": f"bench {i}"})
                lat[side].append(time.perf_counter() - t)
                if result.is_error:
                    raise RuntimeError(f"echo failed ({side}): {result.content}")
            return n / (time.perf_counter() - start)

        for side in ("guard", "direct"):  # warm both: imports, schema compilation, JIT
            await batch(side, max(20, sizes.guard_batch // 2))
        lat = {"direct": [], "guard": []}
        for r in range(sizes.guard_rounds):
            order = ("guard", "direct") if r % 2 == 0 else ("direct", "guard")
            got = {}
            for side in order:
                got[side] = await batch(side, sizes.guard_batch)
                rates[side].append(got[side])
            pairs.append(got["guard"] / got["direct"])

    ratio = median(pairs)
    added50 = (percentile(lat["guard"], 50) - percentile(lat["direct"], 50)) * 1000
    added99 = (percentile(lat["guard"], 99) - percentile(lat["direct"], 99)) * 1000
    progress(f"proxy: ratio {ratio:.3f}, +{added50:.3f} ms p50, +{added99:.3f} ms p99")
    section.metrics = [
        Metric("proxy_overhead_ratio", rounded(ratio), "×", "echo calls/s, through `taskwarden guard` ÷ direct",
               0.8, "higher"),
        Metric("proxy_added_ms_p50", rounded(added50), "ms", "added latency through the guard, p50"),
        Metric("proxy_added_ms_p99", rounded(added99), "ms", "added latency through the guard, p99"),
    ]
    n = sizes.guard_rounds * sizes.guard_batch
    section.details = [
        f"{sizes.guard_rounds} pairs × {sizes.guard_batch} sequential calls per side ({n} calls each side).",
        "",
        "| side | calls/s (median of batches) | p50 | p99 |",
        "|---|---|---|---|",
        *(
            f"| {side} | {fmt(median(rates[side]))} | {fmt(percentile(lat[side], 50) * 1000)} ms "
            f"| {fmt(percentile(lat[side], 99) * 1000)} ms |"
            for side in ("direct", "guard")
        ),
        "",
        f"Paired ratios: median {fmt(ratio)} (range {fmt(min(pairs))}–{fmt(max(pairs))}).",
    ]
    return section
