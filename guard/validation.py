"""Argument checks against a tool's input schema, with errors that name the field and the bound."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match


class ArgumentChecker:
    """One compiled validator per tool schema."""

    def __init__(self, schemas: Mapping[str, Mapping[str, Any]]) -> None:
        # Unknown arguments are refused: a misspelt "timeout" must not be
        # silently ignored while the caller believes it applied.
        self._validators = {
            name: Draft202012Validator({"additionalProperties": False, **schema}) for name, schema in schemas.items()
        }

        # Top-level defaults: policy conditions see an argument the caller
        # left out as the value the tool will use (args.sandbox, say).
        self._defaults = {
            name: {
                key: prop["default"]
                for key, prop in (schema.get("properties") or {}).items()
                if isinstance(prop, Mapping) and prop.get("default") is not None
            }
            for name, schema in schemas.items()
        }

    def __contains__(self, tool: str) -> bool:
        return tool in self._validators

    def with_defaults(self, tool: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments as the tool will see them: the schema's defaults for those left out."""
        return {**self._defaults.get(tool, {}), **args}

    def check(self, tool: str, args: Any) -> tuple[str, str] | None:
        """``(field, message)`` for the most relevant problem, or None if the arguments fit."""
        validator = self._validators.get(tool)
        if validator is None:
            return None
        # NaN and the infinities are not JSON numbers (RFC 8259), but JSON
        # parsers let them through and every bound compares false with NaN.
        odd = _non_finite(args)
        if odd is not None:
            path, value = odd
            return path or "arguments", f"must be a finite number (got {value})"
        if validator.is_valid(args):
            return None
        error = best_match(validator.iter_errors(args))
        if error is None:
            return None
        field, message = describe(error)
        return field or "arguments", message


def describe(error: ValidationError) -> tuple[str, str]:
    # A union (str | list, X | None) reports its most specific branch.
    while error.validator in ("anyOf", "oneOf") and error.context:
        error = _best_branch(error)
    path = ".".join(str(p) for p in error.absolute_path)
    value, bound, kind = error.instance, error.validator_value, error.validator
    match kind:
        case "required":
            missing = error.message.split("'")[1] if "'" in error.message else str(bound)
            return _join(path, missing), "is required"
        case "additionalProperties":
            extra = sorted(set(value) - set(error.schema.get("properties", {}))) if isinstance(value, dict) else []
            return _join(path, extra[0] if extra else "?"), "is not an argument of this tool"
        case "minLength":
            return path, f"must be at least {bound} character{'s' * (bound != 1)} long (got {len(value)})"
        case "maxLength":
            return path, f"must be at most {bound} characters long (got {len(value)})"
        case "minItems":
            return path, f"must have at least {bound} item{'s' * (bound != 1)} (got {len(value)})"
        case "maxItems":
            return path, f"must have at most {bound} items (got {len(value)})"
        case "minimum":
            return path, f"must be >= {bound} (got {value})"
        case "maximum":
            return path, f"must be <= {bound} (got {value})"
        case "exclusiveMinimum":
            return path, f"must be > {bound} (got {value})"
        case "exclusiveMaximum":
            return path, f"must be < {bound} (got {value})"
        case "enum":
            return path, "must be one of " + ", ".join(repr(v) for v in bound) + f" (got {value!r})"
        case "const":
            return path, f"must be {bound!r} (got {value!r})"
        case "type":
            wanted = bound if isinstance(bound, str) else " or ".join(bound)
            return path, f"must be of type {wanted} (got {_json_type(value)})"
        case "pattern":
            return path, f"must match {bound!r}"
        case _:
            return path, error.message


def _non_finite(value: Any) -> tuple[str, float] | None:
    """The path and value of the first NaN or infinity in ``value``, if any."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path, item
        if isinstance(item, dict):
            stack.extend((_join(path, str(k)), v) for k, v in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in reversed(list(enumerate(item))))
    return None


def _best_branch(error: ValidationError) -> ValidationError:
    # Prefer the branch whose type matched (its error is deeper than a type error).
    typed = [e for e in error.context if e.validator != "type"]
    return best_match(typed or error.context) or error.context[0]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
