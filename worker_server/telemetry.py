"""OpenTelemetry: MCP spans, a span per guard decision, task lifecycle metrics.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set or the config says
``otel = true``; when off nothing here is imported by the server and the
SDK's own MCP span middleware is taken out of the request path, so it costs
nothing. When on:

- every MCP request is a SERVER span from the SDK's ``OpenTelemetryMiddleware``
  (``mcp.method.name``, ``gen_ai.tool.name``, ``jsonrpc.request.id``, …);
- every guard decision is a child span ``apply_guardrail <tool>`` with the
  policy, the rule, the decision, its reason and the call's outcome;
- every turn that ends records its queue wait, run time, time in
  ``input_required`` and usage (tokens, cost) as metrics, and a held call's
  approval latency is measured when its decision reaches the caller.

Exporters follow the standard ``OTEL_*`` variables (OTLP over HTTP).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from guard.approvals import Approval
    from guard.gate import Call
    from worker_server.config import Settings
    from worker_server.store import Store

logger = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled")


def wanted(settings: Settings) -> bool:
    """Whether telemetry is on: ``otel = true`` or an OTLP endpoint in the environment."""
    return bool(settings.otel or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def install_exporters() -> None:
    """Global tracer and meter providers exporting over OTLP/HTTP (the ``OTEL_*`` variables apply)."""
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from worker_server import __version__

    resource = Resource.create({"service.name": "taskwarden", "service.version": __version__})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(
        MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
    )


class Telemetry:
    """taskwarden's own spans and instruments, on the global (or given) providers.

    It is the guard's ``GuardTelemetry`` (``decision``, ``approval_decided``)
    and watches the task store for turns that end (``serve``).
    """

    def __init__(self, tracer_provider: Any = None, meter_provider: Any = None, policy_name: str = "built-in") -> None:
        from opentelemetry import metrics, trace

        from worker_server import __version__

        self._trace = trace
        self.tracer = trace.get_tracer("taskwarden", __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter("taskwarden", __version__, meter_provider=meter_provider)
        self.policy_name = policy_name
        self.queue_wait = meter.create_histogram(
            "taskwarden.task.queue_wait", unit="s", description="From accepted to a worker (or person) on it"
        )
        self.run_time = meter.create_histogram(
            "taskwarden.task.run_time", unit="s", description="From a worker on it to the end of the turn"
        )
        self.input_required = meter.create_histogram(
            "taskwarden.task.input_required_time", unit="s", description="Time a turn waited for the agent"
        )
        self.approval_latency = meter.create_histogram(
            "taskwarden.approval.latency", unit="s", description="From a call held for approval to a person's decision"
        )
        self.tokens = meter.create_counter("taskwarden.task.tokens", unit="{token}", description="Tokens turns used")
        self.cost = meter.create_counter("taskwarden.task.cost", unit="USD", description="What turns cost")
        self.turns = meter.create_counter("taskwarden.task.turns", unit="{turn}", description="Turns that ended")

    # -- the guard (guard.gate.GuardTelemetry) ---------------------------------

    def decision(
        self, call: Call, decision: str, rule: str | None, reason: str | None, outcome: str | None, started: float
    ) -> None:
        """One span per guard decision, under the MCP request's span, timed from ``started`` (monotonic)."""
        elapsed_ns = int((time.monotonic() - started) * 1e9)
        end = time.time_ns()
        attributes = {
            "gen_ai.operation.name": "apply_guardrail",
            "gen_ai.tool.name": call.tool,
            "mcp.session.id": call.session,
            "enduser.id": call.identity,
            "taskwarden.guard.policy": self.policy_name,
            "taskwarden.guard.decision": decision,
        }
        for key, value in (("taskwarden.guard.rule", rule), ("taskwarden.guard.reason", reason),
                           ("taskwarden.guard.outcome", outcome), ("mcp.method.name", call.via)):  # fmt: skip
            if value is not None:
                attributes[key] = value
        span = self.tracer.start_span(f"apply_guardrail {call.tool}", start_time=end - elapsed_ns, attributes=attributes)
        if outcome == "refused":
            span.set_status(self._trace.StatusCode.ERROR, f"{decision}: {reason or ''}".strip())
        span.end(end_time=end)

    def approval_decided(self, approval: Approval) -> None:
        if approval.decided_at is not None:
            self.approval_latency.record(
                max(0.0, approval.decided_at - approval.created_at),
                {"gen_ai.tool.name": approval.tool, "taskwarden.approval.status": approval.status.value},
            )

    # -- the task store ---------------------------------------------------------------

    async def serve(self, store: Store, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Record each turn that ends from now on, woken by the store's change feed."""
        after = await store.last_event_id()
        task_status.started()
        while True:
            since = store.feed.generation
            events = await store.events_after(after)
            for event_id, task_id, _at, type_, data in events:
                after = event_id
                if type_ == "status" and json.loads(data or "{}").get("status") in TERMINAL:
                    try:
                        await self._turn_ended(store, task_id)
                    except Exception:  # telemetry never stops the server
                        logger.warning("telemetry for %s failed", task_id, exc_info=True)
            if not events:
                await store.feed.wait(since, 30.0)

    async def _turn_ended(self, store: Store, task_id: str) -> None:
        row = await store.get(task_id)
        history = await store.events_of(task_id)
        created = row.created_at
        started = next((at for _, _, at, t, d in history if t == "status" and '"working"' in (d or "")), None)
        waiting = 0.0
        waiting_since: float | None = None
        for _, _, at, type_, data in history:
            if type_ != "status":
                continue
            status = json.loads(data or "{}").get("status")
            if status == "input_required" and waiting_since is None:
                waiting_since = at
            elif status != "input_required" and waiting_since is not None:
                waiting += at - waiting_since
                waiting_since = None
        ended = row.ended_at or row.updated_at
        attrs = {"taskwarden.worker": row.worker, "taskwarden.kind": row.kind, "taskwarden.status": row.status.value}
        self.turns.add(1, attrs)
        if started is not None:
            self.queue_wait.record(max(0.0, started - created), attrs)
            self.run_time.record(max(0.0, ended - started), attrs)
        self.input_required.record(waiting, attrs)
        usage = row.usage or {}
        tokens = (usage.get("input_tokens") or 0) + (usage.get("output_tokens") or 0)
        if tokens:
            self.tokens.add(tokens, attrs)
        if usage.get("cost_usd"):
            self.cost.add(usage["cost_usd"], attrs)
        # The turn as one span, from accepted to ended, for traces by task.
        span = self.tracer.start_span(
            f"task {row.worker}", start_time=int(created * 1e9),
            attributes={**attrs, "taskwarden.task.id": row.id, "taskwarden.session.id": row.session_id},
        )  # fmt: skip
        if started is not None:
            span.add_event("working", timestamp=int(started * 1e9))
        if row.status.value == "failed":
            span.set_status(self._trace.StatusCode.ERROR, row.status_message or "failed")
        span.end(end_time=int(ended * 1e9))


def without_sdk_spans(middleware: list[Any]) -> list[Any]:
    """``middleware`` without the SDK's OpenTelemetryMiddleware (telemetry off: not even a no-op span)."""
    return [m for m in middleware if type(m).__name__ != "OpenTelemetryMiddleware"]
