r"""Conditions on a call: resolve a path, compare its value with an operator.

Paths are ``args.a.b`` (dots descend into objects; a whole-number segment
indexes a list: ``args.files.0.path``) or ``state.<counter>`` (the current
value of a named counter, supplied by the caller).

Evaluation never raises. A missing value satisfies only ``exists: false``;
every other operator is false on it. A type mismatch (``lt`` on a string,
``regex`` on a number) is false. Booleans are not numbers: ``eq 1`` does not
match ``true``. ``exists`` treats ``null`` as absent, as Intercept does.

Regular expressions run on RE2 (``google-re2``): its syntax is Go's, and its
time is linear in the text, so no pattern and no argument can stall the
server (Python's ``re`` backtracks: ``^(\w+\s?)+$`` on 27 characters took
seconds). Patterns RE2 cannot take (look-arounds, back-references) are
refused when the policy is read. Matching has search semantics (a match
anywhere, like Go's ``MatchString``); patterns are compiled once and cached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Final

import re2

from guard.policy import Condition


class _Missing:
    """The value of a path that does not resolve."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<missing>"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()

ARGS_PREFIX = "args."
STATE_PREFIX = "state."

NUMERIC_OPS = frozenset({"lt", "lte", "gt", "gte"})
LIST_OPS = frozenset({"in", "not_in"})
REGEX_OPS = frozenset({"regex", "not_regex"})

# Reads the current value of a named counter (``state.<name>`` conditions).
StateReader = Callable[[str], int | float]


class PatternError(ValueError):
    """A pattern RE2 cannot compile; the message is RE2's reason."""


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a bad pattern is reported to the policy's author, not to stderr
    return options


_OPTIONS = _re2_options()


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """The compiled RE2 pattern; raises ``PatternError`` for one RE2 cannot take."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise PatternError(str(detail)) from None


def is_number(value: object) -> bool:
    """An int or float, never a bool (``True`` is not 1 in a policy)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(op: str, value: object) -> str | None:
    """What is wrong with ``value`` as the operand of ``op``, or ``None``.

    Readers call this when loading a policy so that a bad operand is reported
    with its file and line, never discovered on a call.
    """
    if op in LIST_OPS:
        if not isinstance(value, list):
            return f"operator {op!r} needs a list value"
    elif op in NUMERIC_OPS:
        if not is_number(value) or not math.isfinite(value):  # type: ignore[arg-type]
            return f"operator {op!r} needs a number"
    elif op in REGEX_OPS:
        if not isinstance(value, str):
            return f"operator {op!r} needs a string pattern"
        try:
            compile_pattern(value)
        except PatternError as exc:
            return (
                f"invalid regular expression {value!r} for RE2 (Go syntax; no look-arounds"
                f" or back-references): {exc}"
            )
    elif op == "exists":
        if not isinstance(value, bool):
            return "operator 'exists' needs true or false"
    elif op == "max_length":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return "operator 'max_length' needs an integer >= 0"
    return None


def check_path(path: str) -> str | None:
    """What is wrong with a condition path, or ``None``."""
    for prefix in (ARGS_PREFIX, STATE_PREFIX):
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            if prefix == ARGS_PREFIX and (not rest or "" in rest.split(".")):
                return f"path {path!r} has an empty segment"
            if prefix == STATE_PREFIX and not rest:
                return f"path {path!r} names no counter"
            return None
    return f"path must start with 'args.' or 'state.', got {path!r}"


def resolve_args(path: str, args: Mapping[str, Any]) -> Any:
    """The value at ``args.…`` ``path`` in ``args``, or ``MISSING``."""
    current: Any = args
    for segment in path[len(ARGS_PREFIX) :].split("."):
        if isinstance(current, Mapping):
            if segment not in current:
                return MISSING
            current = current[segment]
        elif isinstance(current, list) and segment.isdigit():
            index = int(segment)
            if index >= len(current):
                return MISSING
            current = current[index]
        else:
            return MISSING
    return current


def resolve(path: str, args: Mapping[str, Any], state: StateReader | None) -> Any:
    """The value a condition path names, or ``MISSING``."""
    if path.startswith(STATE_PREFIX):
        if state is None:
            return MISSING
        return state(path[len(STATE_PREFIX) :])
    if path.startswith(ARGS_PREFIX):
        return resolve_args(path, args)
    return MISSING


def _equal(a: object, b: object) -> bool:
    if is_number(a) and is_number(b):
        return a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if is_number(a) or is_number(b):
        return False  # "5" is not 5
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def test(op: str, actual: object, expected: object) -> bool:
    """Whether ``actual`` (possibly ``MISSING``) satisfies ``op`` ``expected``."""
    if op == "exists":
        present = actual is not MISSING and actual is not None
        return present == bool(expected)
    if actual is MISSING:
        return False
    if op == "eq":
        return _equal(actual, expected)
    if op == "neq":
        return not _equal(actual, expected)
    if op in LIST_OPS:
        if not isinstance(expected, list):
            return False
        found = any(_equal(actual, item) for item in expected)
        return found if op == "in" else not found
    if op in NUMERIC_OPS:
        if not (is_number(actual) and is_number(expected)):
            return False
        a, b = float(actual), float(expected)  # type: ignore[arg-type]
        return {"lt": a < b, "lte": a <= b, "gt": a > b, "gte": a >= b}[op]
    if op in REGEX_OPS:
        if not isinstance(actual, str) or not isinstance(expected, str):
            return False
        found = compile_pattern(expected).search(actual) is not None
        return found if op == "regex" else not found
    if op == "contains":
        if isinstance(actual, str):
            return isinstance(expected, str) and expected in actual
        if isinstance(actual, list):
            return any(_equal(item, expected) for item in actual)
        return False
    if op == "max_length":
        if isinstance(actual, (str, list, Mapping)) and is_number(expected):
            return len(actual) <= expected  # type: ignore[operator]
        return False
    return False


def holds(
    condition: Condition, args: Mapping[str, Any], state: StateReader | None = None
) -> bool:
    """Whether the call's ``args`` (and counters) satisfy ``condition``."""
    return test(condition.op, resolve(condition.path, args, state), condition.value)


def describe(condition: Condition) -> str:
    """``args.cwd regex "^/home/"`` — for reasons and traces."""
    if condition.op == "exists":
        return f"{condition.path} {'exists' if condition.value else 'is absent'}"
    return f"{condition.path} {condition.op} {show(condition.value)}"


def show(value: object, limit: int = 60) -> str:
    """A short JSON-ish rendering of a value for messages."""
    if value is MISSING:
        return "(missing)"
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
