"""Readers for the event streams agent CLIs print on stdout.

Each reader is fed one stdout line at a time and yields what taskwarden cares
about: the worker's own session id (to resume it next turn), activity lines
(progress a person or agent can follow), notices (errors the worker reports
and may recover from), usage, the final message, and failure.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from worker_server import usage as usage_
from worker_server.profiles import EventFormat

# A single activity line is for reading at a glance; the log has the rest.
MAX_ACTIVITY_CHARS = 500


@dataclass(frozen=True)
class WorkerEvent:
    # notice: an error the worker reported but may recover from (a reconnect);
    # it fails the turn only if the worker then exits non-zero.
    # usage: the turn's usage so far (``usage``), replacing the previous one.
    kind: Literal["session", "activity", "notice", "usage", "final", "failure"]
    text: str
    usage: dict[str, Any] | None = None


class EventReader(Protocol):
    #: Whether every line counts (events), or only the latest ones (plain text).
    every_line: bool

    def feed(self, line: str) -> list[WorkerEvent]: ...

    def final(self) -> str | None:
        """The final output once the stream has ended (None if there was none)."""
        ...


def reader_for(fmt: EventFormat) -> EventReader:
    if fmt == "codex-jsonl":
        return CodexReader()
    if fmt == "claude-stream-json":
        return ClaudeReader()
    return TextReader()


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ACTIVITY_CHARS else text[: MAX_ACTIVITY_CHARS - 1] + "…"


def _api_message(text: str) -> str:
    """An API error body the CLI passed on verbatim (``{"error": {"message": …}}``) → its message."""
    body = _json_object(text)
    error = body.get("error") if body else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return text


def _json_object(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class CodexReader:
    """``codex exec --json``: thread.started, item.completed, turn.completed/failed, error.

    A top-level ``error`` is a notice: Codex prints "Reconnecting... 1/5" that
    way and then carries on. The turn fails on ``turn.failed`` (or exit status).
    """

    every_line = True

    def __init__(self) -> None:
        self._final: str | None = None
        self._usage: list[dict[str, Any]] = []
        # Error items before the turn starts are start-up warnings ("Model
        # metadata … not found"): the log keeps them, the tail shows the work.
        self._started = False

    def feed(self, line: str) -> list[WorkerEvent]:
        event = _json_object(line)
        if event is None:
            return [WorkerEvent("activity", _clip(line))] if line.strip() else []
        kind = event.get("type")
        if kind == "thread.started" and isinstance(event.get("thread_id"), str):
            return [WorkerEvent("session", event["thread_id"])]
        if kind == "turn.started":
            self._started = True
        if kind == "item.completed" and isinstance(event.get("item"), dict):
            return self._item(event["item"])
        if kind == "turn.completed" and isinstance(event.get("usage"), dict):
            self._usage.append(usage_.from_codex(event["usage"]))
            return [WorkerEvent("usage", "", usage_.add(self._usage))]
        if kind == "turn.failed":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            return [WorkerEvent("failure", _api_message(str(message or "turn failed")))]
        if kind == "error":
            return [WorkerEvent("notice", _api_message(str(event.get("message") or "error")))]
        return []

    def _item(self, item: dict[str, Any]) -> list[WorkerEvent]:
        item_type = item.get("type")
        if item_type == "agent_message" and isinstance(item.get("text"), str):
            self._final = item["text"]
            return [WorkerEvent("activity", _clip(item["text"]))]
        if item_type == "command_execution" and item.get("command"):
            code = item.get("exit_code")
            suffix = f" (exit {code})" if code is not None else ""
            return [WorkerEvent("activity", _clip(f"$ {item['command']}{suffix}"))]
        if item_type == "file_change" and isinstance(item.get("changes"), list):
            paths = [c.get("path", "?") for c in item["changes"] if isinstance(c, dict)]
            return [WorkerEvent("activity", _clip("edited " + ", ".join(paths)))]
        if item_type == "error" and self._started and isinstance(item.get("message"), str):
            return [WorkerEvent("activity", _clip("error: " + item["message"]))]
        return []

    def final(self) -> str | None:
        return self._final


class ClaudeReader:
    """``claude -p --output-format stream-json``: system/init, assistant, result.

    Usage: each assistant message carries its own (as the stream started, so
    output counts are low) until ``result`` gives the turn's whole usage and cost.
    """

    every_line = True

    def __init__(self) -> None:
        self._final: str | None = None
        self._last_text: str | None = None
        self._message_usage: dict[str, dict[str, Any]] = {}

    def feed(self, line: str) -> list[WorkerEvent]:
        event = _json_object(line)
        if event is None:
            return [WorkerEvent("activity", _clip(line))] if line.strip() else []
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init" and isinstance(event.get("session_id"), str):
            return [WorkerEvent("session", event["session_id"])]
        if kind == "assistant" and isinstance(event.get("message"), dict):
            return self._assistant(event["message"])
        if kind == "system" and event.get("subtype") == "api_retry":
            return [WorkerEvent("notice", f"API retry {event.get('attempt')}: {event.get('error_status') or event.get('error')}")]
        if kind == "result":
            events: list[WorkerEvent] = []
            if isinstance(event.get("usage"), dict):
                events.append(WorkerEvent("usage", "", usage_.from_anthropic(event["usage"], event.get("total_cost_usd"))))
            result = event.get("result")
            text = result if isinstance(result, str) else None
            if event.get("is_error"):
                return [*events, WorkerEvent("failure", text or str(event.get("subtype") or "error"))]
            self._final = text
            return [*events, WorkerEvent("final", text)] if text is not None else events
        return []

    def _assistant(self, message: dict[str, Any]) -> list[WorkerEvent]:
        events: list[WorkerEvent] = []
        if isinstance(message.get("usage"), dict) and message.get("model") != "<synthetic>":
            # One message may arrive in several events (one per content block).
            self._message_usage[str(message.get("id"))] = usage_.from_anthropic(message["usage"])
            events.append(WorkerEvent("usage", "", usage_.add(self._message_usage.values())))
        for block in message.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                self._last_text = block["text"]
                events.append(WorkerEvent("activity", _clip(block["text"])))
            elif block.get("type") == "tool_use":
                events.append(WorkerEvent("activity", _clip(f"→ {block.get('name', 'tool')}")))
        return events

    def final(self) -> str | None:
        return self._final if self._final is not None else self._last_text


class TextReader:
    """Plain text: every line is activity; the final output is the last lines."""

    # The final output is capped later anyway; keep only what could be shown.
    KEEP_LINES = 200
    KEEP_CHARS = 64 * 1024
    # Every line is activity and only the last ones are kept or shown.
    every_line = False

    def __init__(self) -> None:
        self._lines: deque[str] = deque()
        self._chars = 0

    def feed(self, line: str) -> list[WorkerEvent]:
        line = line.rstrip("\r\n")
        self._lines.append(line)
        self._chars += len(line) + 1
        while len(self._lines) > self.KEEP_LINES or (self._chars > self.KEEP_CHARS and len(self._lines) > 1):
            self._chars -= len(self._lines.popleft()) + 1
        return [WorkerEvent("activity", _clip(line))] if line.strip() else []

    def final(self) -> str | None:
        lines = list(self._lines)
        while lines and not lines[-1].strip():
            lines.pop()
        return "\n".join(lines) if lines else None
