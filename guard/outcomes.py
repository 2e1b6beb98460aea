"""The shape of a refused call: an ``isError`` result a model can act on.

The first text line says what happened and what to do; the structured
content carries ``{error, tool, rule, reason, field?, retry_after_s?, approval?,
budget?, used?}``.

Strict clients (the TypeScript SDK v1, the MCP Inspector) validate an error
result's structured content against the tool's output schema before showing
anything, so a server behind the guard publishes output schemas that admit
this shape too: ``admit_refusals`` composes them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ErrorKind = Literal[
    "policy_denied",
    "invalid_arguments",
    "rate_limited",
    "approval_required",
    "approval_denied",
    "approval_expired",
    "budget_exhausted",
    "unavailable",
]

# The structured content of every refusal, as JSON Schema. Written by hand
# (not generated) because it is a published contract; it uses only keywords
# that draft-07 validators (Ajv in the TypeScript SDK v1) and draft 2020-12
# validators (jsonschema in the Python SDK) read alike.
REFUSAL_SCHEMA: dict[str, Any] = {
    "title": "Refusal",
    "description": "An isError result: the guard or the tool refused the call. "
    "The first text line says what to do next.",
    "type": "object",
    "properties": {
        "error": {"type": "string", "enum": list(get_args(ErrorKind))},
        "tool": {"type": "string"},
        "rule": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "The policy rule, or schema"},
        "reason": {"type": "string"},
        "field": {"type": "string", "description": "invalid_arguments: the argument at fault"},
        "retry_after_s": {"type": "number", "minimum": 0},
        "budget": {"type": "string", "description": "budget_exhausted: the spent budget's name"},
        "used": {"type": "object", "description": "budget_exhausted: what was used in the window, by metric"},
        "approval": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "status": {"type": "string", "enum": ["pending", "approved", "denied", "expired"]},
                "expires_at": {"type": "string"},
                "how_to_approve": {"type": "string"},
            },
            "required": ["id", "status", "expires_at", "how_to_approve"],
        },
    },
    "required": ["error", "tool", "rule", "reason"],
}

_REFUSAL_DEF = "TaskwardenRefusal"


def admit_refusals(output_schema: Mapping[str, Any]) -> dict[str, Any]:
    """``output_schema`` widened to ``anyOf`` [the tool's result, a refusal].

    The root keeps ``type: object`` (the TypeScript SDK v1 requires it of an
    output schema) and the tool's ``$defs`` (its ``$ref``s point there).
    """
    body = copy.deepcopy(dict(output_schema))
    defs = body.pop("$defs", {})
    if _REFUSAL_DEF in defs:
        return copy.deepcopy(dict(output_schema))  # already admits refusals
    composed: dict[str, Any] = {"type": "object"}
    if "title" in body:
        composed["title"] = body["title"]
    composed["anyOf"] = [body, {"$ref": f"#/$defs/{_REFUSAL_DEF}"}]
    composed["$defs"] = {**defs, _REFUSAL_DEF: copy.deepcopy(REFUSAL_SCHEMA)}
    return composed


@dataclass(frozen=True)
class Refusal:
    error: ErrorKind
    tool: str
    rule: str | None
    reason: str
    retry_after_s: float | None = None
    approval: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def structured(self) -> dict[str, Any]:
        data: dict[str, Any] = {"error": self.error, "tool": self.tool, "rule": self.rule, "reason": self.reason}
        if self.retry_after_s is not None:
            data["retry_after_s"] = self.retry_after_s
        if self.approval is not None:
            data["approval"] = self.approval
        data.update(self.extra)
        return data

    def first_line(self) -> str:
        match self.error:
            case "rate_limited":
                return (
                    f"rate_limited: {self.tool} is limited to {self.reason}; "
                    f"retry after {self.retry_after_s:.1f} s."
                )
            case "approval_required":
                how = (self.approval or {}).get("how_to_approve", "")
                return f"approval_required: {self.tool} needs a human's approval ({self.reason}). {how}"
            case "approval_denied":
                approval_id = (self.approval or {}).get("id", "")
                return (
                    f"approval_denied: a human denied this {self.tool} call ({approval_id}): {self.reason}. "
                    "Do not repeat it unchanged; calling again asks again."
                )
            case "approval_expired":
                return (
                    f"approval_expired: nobody approved this {self.tool} call in time; "
                    "calling again opens a new approval."
                )
            case "invalid_arguments":
                return f"invalid_arguments: {self.reason}"
            case "budget_exhausted":
                after = f"; retry after {self.retry_after_s:.1f} s" if self.retry_after_s is not None else ""
                return f"budget_exhausted: {self.tool}: {self.reason}{after}."
            case "unavailable":
                return f"unavailable: {self.tool}: {self.reason}"
            case _:
                return f"policy_denied: {self.tool} is not allowed: {self.reason}"

    def text(self) -> str:
        return self.first_line() + "\n" + json.dumps(self.structured(), ensure_ascii=False)
