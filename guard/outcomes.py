"""The shape of a refused call: an ``isError`` result a model can act on.

The first text line says what happened and what to do; the structured
content carries ``{error, tool, rule, reason, retry_after_s?, approval?}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

ErrorKind = Literal[
    "policy_denied",
    "invalid_arguments",
    "rate_limited",
    "approval_required",
    "approval_denied",
    "approval_expired",
]


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
            case _:
                return f"policy_denied: {self.tool} is not allowed: {self.reason}"

    def text(self) -> str:
        return self.first_line() + "\n" + json.dumps(self.structured(), ensure_ascii=False)
