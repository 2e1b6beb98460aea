"""OpenTelemetry, read back through the SDK's in-memory exporter and metric reader.

The server runs in this process (so its spans land in the exporter) and is
called through the SDK's client; the worker is the fake agent in a real process.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.support import Workspace, wait_until
from worker_server.config import load_settings
from worker_server.app import open_app
from worker_server.server import build_mcp
from worker_server.telemetry import Telemetry

pytestmark = pytest.mark.anyio

SPANS = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(SPANS))

POLICY = """\
    default: allow
    tools:
      cancel-task:
        rules:
          - action: require_approval
            reason: "Cancelling needs a human"
            approval: {wait_s: 1, expires_s: 300}
    """


@pytest.fixture(scope="module", autouse=True)
def _global_tracer() -> None:
    # The SDK's MCP span middleware uses the global provider (set once per process).
    trace.set_tracer_provider(_PROVIDER)


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


async def test_mcp_guard_and_task_lifecycle_telemetry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    ws = Workspace(tmp_path, policy=policy)
    settings = load_settings(ws.config)
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider=_PROVIDER, meter_provider=MeterProvider(metric_readers=[reader]),
                          policy_name=str(policy))  # fmt: skip
    SPANS.clear()
    monkeypatch.chdir(ws.work)
    async with open_app(settings, telemetry=telemetry) as app:
        mcp = build_mcp(app)
        async with Client(mcp) as client:
            spawned = await client.call_tool("spawn-task", {"prompt": "say traced"})
            task_id = spawned.structured_content["task_id"]
            done = await client.call_tool("wait-task", {"task_ids": task_id, "timeout_s": 30})
            assert done.structured_content["tasks"][0]["status"] == "completed"
            refused = await client.call_tool("spawn-task", {"prompt": "x", "timeout_s": 999999})
            assert refused.is_error
            sleeper = (await client.call_tool("spawn-task", {"prompt": "sleep 60"})).structured_content["task_id"]
            held = await client.call_tool("cancel-task", {"task_id": sleeper})
            approval_id = held.structured_content["approval"]["id"]
            await app.guard.approvals.decide(approval_id, False, "maria", "keep it")
            denied = await client.call_tool("cancel-task", {"task_id": sleeper})
            assert denied.structured_content["error"] == "approval_denied"
        await wait_until(lambda: "taskwarden.task.run_time" in metric_points(reader))

    spans = SPANS.get_finished_spans()
    calls = [s for s in spans if s.name == "tools/call spawn-task"]
    assert len(calls) == 3 and all(s.kind == SpanKind.SERVER for s in calls)
    assert calls[0].attributes["mcp.method.name"] == "tools/call"
    assert calls[0].attributes["gen_ai.tool.name"] == "spawn-task"

    decisions = [s for s in spans if s.name == "apply_guardrail spawn-task"]
    assert len(decisions) == 3
    allowed, invalid = decisions[0], decisions[1]
    # Each decision is a child of its MCP request's span.
    assert allowed.parent is not None and allowed.parent.span_id == calls[0].context.span_id
    assert allowed.attributes["gen_ai.operation.name"] == "apply_guardrail"
    assert allowed.attributes["taskwarden.guard.policy"] == str(policy)
    assert allowed.attributes["taskwarden.guard.decision"] == "allow"
    assert allowed.attributes["taskwarden.guard.rule"] == "default"
    assert allowed.attributes["taskwarden.guard.outcome"] == "ok"
    assert invalid.attributes["taskwarden.guard.decision"] == "invalid_arguments"
    assert invalid.attributes["taskwarden.guard.outcome"] == "refused"
    assert "timeout_s" in invalid.attributes["taskwarden.guard.reason"]
    assert invalid.status.status_code == StatusCode.ERROR
    cancels = [s.attributes["taskwarden.guard.decision"] for s in spans if s.name == "apply_guardrail cancel-task"]
    assert cancels == ["approval_required", "approval_denied"]

    [turn] = [s for s in spans if s.name == "task fake" and s.attributes["taskwarden.task.id"] == task_id]
    assert turn.attributes["taskwarden.status"] == "completed"
    assert [e.name for e in turn.events] == ["working"]

    points = metric_points(reader)
    for name in ("taskwarden.task.queue_wait", "taskwarden.task.run_time", "taskwarden.task.input_required_time"):
        [point] = [p for p in points[name] if p.attributes["taskwarden.worker"] == "fake"]
        assert point.count >= 1 and point.sum >= 0, name
    [latency] = points["taskwarden.approval.latency"]
    assert latency.count == 1 and latency.attributes["taskwarden.approval.status"] == "denied"
    assert sum(p.value for p in points["taskwarden.task.turns"]) >= 1


async def test_telemetry_off_costs_no_span(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    ws = Workspace(tmp_path)
    settings = load_settings(ws.config)
    assert settings.otel is False
    SPANS.clear()
    async with open_app(settings, run_workers=False) as app:
        assert app.telemetry is None and app.guard.telemetry is None
        mcp = build_mcp(app)
        assert not [m for m in mcp.middleware if type(m).__name__ == "OpenTelemetryMiddleware"]
        async with Client(mcp) as client:
            await client.call_tool("list-tasks", {})
    assert SPANS.get_finished_spans() == ()
