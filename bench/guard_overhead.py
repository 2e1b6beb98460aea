"""What the guard costs a cheap read tool: get-task with the guard in front vs without."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcp import Client

from bench.core import Metric, Section, Sizes, fmt, median, percentile, progress, rounded
from bench.workspace import Workspace
from guard.audit import Outcome
from guard.middleware import GuardMiddleware
from guard.gate import Admission, Call
from worker_server.config import load_settings
from worker_server.app import open_app
from worker_server.server import build_mcp
from worker_server.service import Caller
from worker_server.task import TaskStatus

TITLE = "Guard overhead on a cheap read tool"
METHOD = """\
One server built in the bench process (`open_app` + `build_mcp`, the built-in
policy, which allows `get-task`), one SDK client connected to it in memory
(`mcp.Client(server)`: no transport, no JSON framing, so the guard's share of
each call is as large as it can be). The guard is switched by taking its
middleware object out of `server.middleware` and putting it back (the SDK
composes the chain per request). Batches of `get-task` calls on one completed
task alternate guard on / guard off (ABBA order, so neither side always runs
first), after a warm-up. The ratio is the median over pairs of (calls/s with
the guard) / (calls/s without), each pair measured back to back. The added
latency (`guard_added_ms_*`) is the guard's own time per call, `Guard.admit`
plus `Guard.settle` timed around them on the same server, one call after
another: a duration, never negative. (The difference of the on and off sides'
p99, shown in the table, is a difference of two noisy tails and can come out
negative in a short run.)
The headline uses the client's default for an in-process server (the
per-request path of protocol 2026-07-28, no JSON-RPC framing); the same
measurement then runs through a handshake-era JSON-RPC session
(`Client(server, mode="legacy")`), which is how stdio clients connect today.

What telemetry costs when it is off, with the guard on, through the default
client: batches alternate (ABBA, as above) between the server as taskwarden
builds it with OpenTelemetry off (the SDK's `OpenTelemetryMiddleware` taken
out of the chain, no guard telemetry) and the same server with OpenTelemetry
off but its hooks left in (the SDK's middleware back at the head of the
chain, the guard reporting each decision to `worker_server.telemetry`), on
the OpenTelemetry API's no-op providers (no SDK configured, nothing
exported). `telemetry_off_ratio` is the median over pairs of (calls/s with
the hooks in) / (calls/s with them removed): what leaving them in would
cost; taskwarden's own "off" is the removed side.

With the guard on, every call is decided (policy, argument schema, counter
conditions) and audited. `get-task` is read-only (its annotations say so),
so its audit row is queued and committed by the batching writer within
20 ms, sharing the commit with its neighbours, rather than before the
result returns; refusals and calls to tools that may change something are
committed before their result (WAL, `synchronous = NORMAL`: a committed row
survives a crash of the process; only a power loss can drop the last
commits)."""


async def run(sizes: Sizes, scratch: Path) -> Section:
    section = Section("guard", TITLE, METHOD)
    ws = Workspace(scratch, policy=None)  # None: the built-in policy, as users run it
    settings = load_settings(ws.config)
    async with open_app(settings, run_workers=False, background=False) as app:
        view = await app.service.spawn(Caller("bench", "bench"), prompt="echo hello", cwd=str(ws.work))
        await app.store.finish(
            view.task_id, TaskStatus.COMPLETED, final="hello", exit_code=0, tail="hello\n" * 20
        )
        server = build_mcp(app)
        chain = server.middleware
        guard = next(m for m in chain if isinstance(m, GuardMiddleware))
        position = chain.index(guard)

        def switch(on: bool) -> None:
            if on and guard not in chain:
                chain.insert(position, guard)
            elif not on and guard in chain:
                chain.remove(guard)

        args = {"task_id": view.task_id}
        # The SDK's default for an in-process server (the per-request path,
        # no JSON-RPC framing) is the headline, as the method prescribes; the
        # handshake-era JSON-RPC session, which stdio clients use today,
        # follows with the same server.
        async with Client(server) as client:
            modern = await _ab(client, args, switch, sizes)
        async with Client(server, mode="legacy") as client:
            legacy = await _ab(client, args, switch, sizes)
        switch(True)

        # Telemetry off: its hooks left in (no-op providers) vs removed (as taskwarden runs).
        hooks_in = _telemetry_hooks(chain, app.guard)
        async with Client(server) as client:
            telemetry = await _ab(client, args, hooks_in, sizes)
        hooks_in(False)

        # Where the added time goes: the guard's two halves, called directly.
        admit_us, settle_us, guard_ms = await _halves(app.guard, view.task_id, sizes)

    progress(
        f"guard: ratio {modern.ratio:.3f}, its own time {percentile(guard_ms, 50):.3f} ms p50, "
        f"{percentile(guard_ms, 99):.3f} ms p99; "
        f"legacy session {legacy.ratio:.3f}; telemetry off, hooks in ÷ removed {telemetry.ratio:.3f}"
    )
    section.metrics = [
        Metric("guard_overhead_ratio", rounded(modern.ratio), "×", "get-task calls/s, guard on ÷ off", 0.85, "higher"),
        Metric("guard_added_ms_p50", rounded(percentile(guard_ms, 50)), "ms",
               "the guard's own time per call (`admit` + `settle`, timed around them), p50"),
        Metric("guard_added_ms_p99", rounded(percentile(guard_ms, 99)), "ms", "the same, p99"),
        Metric(
            "guard_overhead_ratio_legacy_session",
            rounded(legacy.ratio),
            "×",
            "the same through a JSON-RPC session (`mode=\"legacy\"`, as stdio clients connect)",
        ),
        Metric(
            "telemetry_off_ratio",
            rounded(telemetry.ratio),
            "×",
            "OpenTelemetry off: get-task calls/s with the SDK span middleware and guard hooks left in (no-op "
            "providers) ÷ removed, as taskwarden runs",
        ),
    ]
    n = sizes.guard_rounds * sizes.guard_batch
    section.details = [
        f"{sizes.guard_rounds} pairs × {sizes.guard_batch} calls per side ({n} calls each side), per client mode.",
        "",
        "| client mode | calls/s on | calls/s off | p50 on | p50 off | p99 on | p99 off | ratio of medians | "
        "paired ratios: median (range) |",
        "|---|---|---|---|---|---|---|---|---|",
        _row("default (per-request, no framing): headline", modern),
        _row("legacy (JSON-RPC session)", legacy),
        "",
        f"The guard's halves called directly (median of {sizes.guard_batch * 4} calls each): "
        f"`Guard.admit` (decision, schema check) {fmt(admit_us)} µs; "
        f"`Guard.settle` (audit row redacted, digested, committed) {fmt(settle_us)} µs.",
        "",
        "OpenTelemetry off, guard on, default client mode: its hooks left in (no-op providers) vs removed "
        "(taskwarden's off), side by side.",
        "",
        "| telemetry off | calls/s | p50 | p99 |",
        "|---|---|---|---|",
        _side("hooks left in: SDK span middleware, guard decision spans (no-op)", telemetry, True),
        _side("removed (as taskwarden runs)", telemetry, False),
        "",
        f"Ratio (hooks in ÷ removed): median of {len(telemetry.pair_ratios)} paired ratios "
        f"{fmt(telemetry.ratio)} (range {fmt(min(telemetry.pair_ratios))}–{fmt(max(telemetry.pair_ratios))}); "
        f"ratio of median rates {fmt(median(telemetry.rates[True]) / median(telemetry.rates[False]))}.",
    ]
    return section


class _AB:
    """One client's interleaved batches: rates and latencies with the guard on and off."""

    def __init__(self) -> None:
        self.pair_ratios: list[float] = []
        self.rates: dict[bool, list[float]] = {True: [], False: []}
        self.lat: dict[bool, list[float]] = {True: [], False: []}

    @property
    def ratio(self) -> float:
        return median(self.pair_ratios)


async def _ab(client: Client, args: dict[str, str], switch: Callable[[bool], None], sizes: Sizes) -> _AB:
    async def batch(n: int) -> tuple[float, list[float]]:
        latencies: list[float] = []
        start = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            result = await client.call_tool("get-task", args)
            latencies.append(time.perf_counter() - t)
            if result.is_error:
                raise RuntimeError(f"get-task failed: {result.content}")
        return n / (time.perf_counter() - start), latencies

    for on in (True, False):  # warm both paths: imports, caches, schema compilation
        switch(on)
        await batch(max(20, sizes.guard_batch // 2))
    ab = _AB()
    for r in range(sizes.guard_rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        got: dict[bool, float] = {}
        for on in order:
            switch(on)
            rate, latencies = await batch(sizes.guard_batch)
            got[on] = rate
            ab.rates[on].append(rate)
            ab.lat[on].extend(latencies)
        ab.pair_ratios.append(got[True] / got[False])
    return ab


def _row(name: str, ab: _AB) -> str:
    on, off = ab.rates[True], ab.rates[False]

    def ms(on_side: bool, p: float) -> str:
        return fmt(percentile(ab.lat[on_side], p) * 1000)

    return (
        f"| {name} | {fmt(median(on))} | {fmt(median(off))} | {ms(True, 50)} ms | {ms(False, 50)} ms "
        f"| {ms(True, 99)} ms | {ms(False, 99)} ms | {fmt(median(on) / median(off))} "
        f"| {fmt(ab.ratio)} ({fmt(min(ab.pair_ratios))}–{fmt(max(ab.pair_ratios))}) |"
    )


def _telemetry_hooks(chain: list[Any], guard: Any) -> Callable[[bool], None]:
    """A switch: True puts OpenTelemetry's hooks back as the SDK and ``Telemetry`` would
    (on the API's default, no-op providers: nothing is recorded); False takes them out."""
    from mcp.server.mcpserver import MCPServer

    from worker_server.telemetry import Telemetry

    # The SDK's own span middleware, as every server starts with it.
    sdk_spans = next(m for m in MCPServer("probe").middleware if type(m).__name__ == "OpenTelemetryMiddleware")
    ours = Telemetry()

    def switch(on: bool) -> None:
        if on and sdk_spans not in chain:
            chain.insert(0, sdk_spans)  # where MCPServer puts it: outermost
            guard.telemetry = ours
        elif not on and sdk_spans in chain:
            chain.remove(sdk_spans)
            guard.telemetry = None

    return switch


def _side(name: str, ab: _AB, on: bool) -> str:
    def ms(p: float) -> str:
        return fmt(percentile(ab.lat[on], p) * 1000)

    return f"| {name} | {fmt(median(ab.rates[on]))} | {ms(50)} ms | {ms(99)} ms |"


async def _halves(guard: object, task_id: str, sizes: Sizes) -> tuple[float, float, list[float]]:
    from guard.gate import Guard

    assert isinstance(guard, Guard)
    call = Call("get-task", {"task_id": task_id}, "bench", "bench")
    admit: list[float] = []
    settle: list[float] = []
    for _ in range(sizes.guard_batch * 4):
        t = time.perf_counter()
        admission = await guard.admit(call)
        admit.append(time.perf_counter() - t)
        assert isinstance(admission, Admission)
        t = time.perf_counter()
        await guard.settle(admission, Outcome.OK)
        settle.append(time.perf_counter() - t)
    # Per call, in ms: a time, never negative (unlike a difference of two tails).
    both = [(a + b) * 1000 for a, b in zip(admit, settle)]
    return median(admit) * 1e6, median(settle) * 1e6, both
