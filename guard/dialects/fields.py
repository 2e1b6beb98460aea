"""Field readers the dialects share: windows, conditions, named counters."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from guard import conditions
from guard.dialects.source import Node, PolicyError
from guard.policy import OPS, Condition, Counter, Scope

M = TypeVar("M", bound=BaseModel)

WINDOWS: dict[str, float] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

# Intercept's own operator set: it has no not_regex or max_length.
INTERCEPT_OPS: tuple[str, ...] = (
    "eq", "neq", "in", "not_in", "lt", "lte", "gt", "gte", "regex", "contains", "exists",
)  # fmt: skip


def read_window(node: Node, *, names: Collection[str] = tuple(WINDOWS)) -> float:
    """Seconds (a number > 0) or a window name such as ``"minute"``."""
    if isinstance(node.value, str):
        return WINDOWS[node.choice(names)]
    if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.number(minimum=0, exclusive=True)
    expected = ", ".join(f'"{n}"' for n in names)
    raise node.error(
        f"must be a number of seconds > 0 or one of {expected}, got {conditions.show(node.value)}"
    )


def read_condition(
    node: Node, *, ops: Collection[str] = OPS, exists_default: bool | None = None
) -> tuple[Condition, Node]:
    """A ``{path, op, value}`` condition and the node of its path.

    ``exists_default``: the value ``exists`` takes when ``value`` is left out
    (``None``: ``value`` is always required).
    """
    entries = node.mapping(("path", "op", "value"), required=("path", "op"))
    path_node = entries["path"]
    path = path_node.string()
    problem = conditions.check_path(path)
    if problem:
        raise path_node.error(problem)
    op = entries["op"].choice(ops)
    if "value" in entries:
        value_node = entries["value"]
        value = value_node.plain()
    elif op == "exists" and exists_default is not None:
        value_node, value = node, exists_default
    else:
        raise node.error(f"missing required key 'value' (operator {op!r} compares with it)")
    problem = conditions.check(op, value)
    if problem:
        raise value_node.error(problem)
    return build(node, Condition, path=path, op=op, value=value), path_node


def read_cost_from(node: Node) -> str:
    """An ``args.…`` path whose value is a call's cost."""
    path = node.string()
    if not path.startswith(conditions.ARGS_PREFIX):
        raise node.error(f"must be a path starting with 'args.', got {conditions.show(path)}")
    problem = conditions.check_path(path)
    if problem:
        raise node.error(problem)
    return path


def build(node: Node, model: type[M], **values: object) -> M:
    """``model(**values)``, with a validation failure reported at ``node``."""
    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise node.error(f"{where}: {first['msg']}" if where else first["msg"]) from exc


@dataclass
class CounterRegistry:
    """Named counters seen so far, and the ``state.`` references to check at the end."""

    counters: dict[str, Counter] = field(default_factory=dict)
    _where: dict[str, Node] = field(default_factory=dict)
    _references: list[tuple[str, Node]] = field(default_factory=list)
    # Intercept counters fed by ``increment_from: usage.…``: budgets, not counters.
    usage: set[str] = field(default_factory=set)

    def define(self, name: str, window_s: float, scope: Scope, node: Node) -> None:
        """Register a counter; one name must keep one window and scope."""
        known = self.counters.get(name)
        if known is not None and (known.window_s != window_s or known.scope != scope):
            first = self._where[name]
            raise node.error(
                f"counter {name!r} is already defined with a {known.window_s:g} s window "
                f"per {known.scope} (line {first.line}); "
                "a shared counter needs one window and scope"
            )
        if known is None:
            self.counters[name] = Counter(window_s=window_s, scope=scope)
            self._where[name] = node

    def refer(self, name: str, node: Node) -> None:
        self._references.append((name, node))

    def check_references(self, hint: str = "") -> None:
        for name, node in self._references:
            if name not in self.counters:
                raise node.error(f"condition reads counter {name!r}, which no rule defines{hint}")


def version(node: Node) -> str:
    """The policy format version: ``"1"`` (or the number 1)."""
    if node.value == "1" or (node.value == 1 and not isinstance(node.value, bool)):
        return "1"
    raise node.error(f'must be "1", got {conditions.show(node.value)}')


__all__ = [
    "INTERCEPT_OPS",
    "WINDOWS",
    "CounterRegistry",
    "PolicyError",
    "build",
    "read_condition",
    "read_cost_from",
    "read_window",
    "version",
]
