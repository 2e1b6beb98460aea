"""Policy text read into located values, so every error names file, line and key.

``parse_yaml`` and ``parse_json`` turn text into a tree of ``Node``: each
value with the line it sits on and its key path (``tools.spawn-task.rules[0]
.rate_limit.max``). Readers walk the tree with the typed accessors, which
raise ``PolicyError`` pointing at the offending key.

YAML is read with the YAML 1.2 core schema, as Intercept's Go reader does:
only ``true``/``false`` are booleans (``no`` and ``on`` stay strings) and
``12:30`` is not a base-60 number. Mapping keys are always strings, exactly
as written.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from guard.conditions import show


class PolicyError(ValueError):
    """A policy (or cases) file that cannot be used; ``str()`` is ``file:line: key: message``."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.source or "<policy>"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class Node:
    """One value of a policy document, with where it came from."""

    # dict[str, Node] | list[Node] | str | int | float | bool | None
    value: Any
    line: int | None
    key: str  # the path to this value; "" for the document itself
    source: str

    def error(self, message: str) -> PolicyError:
        return PolicyError(message, source=self.source, line=self.line, key=self.key or None)

    # -- shape -------------------------------------------------------------

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.value, dict)

    def mapping(
        self,
        allowed: Collection[str] | None = None,
        *,
        required: Iterable[str] = (),
        what: str = "a mapping",
    ) -> dict[str, Node]:
        """The entries of a mapping; unknown or missing keys are errors."""
        if not isinstance(self.value, dict):
            raise self.error(f"must be {what}, got {_kind(self.value)}")
        entries: dict[str, Node] = self.value
        if allowed is not None:
            for name, child in entries.items():
                if name not in allowed:
                    raise child.error(f"unknown key (expected one of: {', '.join(allowed)})")
        for name in required:
            if name not in entries:
                raise self.error(f"missing required key {name!r}")
        return entries

    def sequence(self, *, allow_null: bool = True) -> list[Node]:
        """The items of a list; ``null`` (an empty YAML value) reads as ``[]``."""
        if self.value is None and allow_null:
            return []
        if not isinstance(self.value, list):
            raise self.error(f"must be a list, got {_kind(self.value)}")
        return self.value

    # -- scalars -----------------------------------------------------------

    def string(self, *, empty: bool = False) -> str:
        if not isinstance(self.value, str):
            raise self.error(f"must be a string, got {_kind(self.value)}")
        if not empty and not self.value.strip():
            raise self.error("must not be empty")
        return self.value

    def choice(self, options: Collection[str]) -> str:
        if not isinstance(self.value, str) or self.value not in options:
            expected = ", ".join(f'"{o}"' for o in options)
            raise self.error(f"must be one of {expected}, got {show(self.value)}")
        return self.value

    def integer(self, *, minimum: int | None = None) -> int:
        value = self.value
        # 30.0 is written by some JSON emitters for 30; accept whole floats.
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or (
            minimum is not None and value < minimum
        ):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise self.error(f"must be an integer{bound}, got {show(self.value)}")
        return value

    def number(self, *, minimum: float | None = None, exclusive: bool = False) -> float:
        value = self.value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        if ok and minimum is not None:
            ok = value > minimum if exclusive else value >= minimum
        if not ok:
            bound = ""
            if minimum is not None:
                bound = f" {'>' if exclusive else '>='} {minimum:g}"
            raise self.error(f"must be a number{bound}, got {show(self.value)}")
        return float(value)

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.error(f"must be true or false, got {show(self.value)}")
        return self.value

    def strings(self, *, unique: bool = True) -> tuple[str, ...]:
        """A list of non-empty strings (tool names, identities)."""
        seen: list[str] = []
        for item in self.sequence():
            text = item.string()
            if unique and text in seen:
                raise item.error(f"duplicate entry {show(text)}")
            seen.append(text)
        return tuple(seen)

    def plain(self) -> Any:
        """The value without locations (``dict``/``list``/scalars)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value

    # -- children ----------------------------------------------------------

    def child_key(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"a boolean ({show(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({show(value)})"
    return f"a string ({show(value)})"


# -- YAML --------------------------------------------------------------------


class _CoreLoader(Reader, Scanner, Parser, Composer, Resolver):
    """A composer that resolves plain scalars with the YAML 1.2 core schema."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        Resolver.__init__(self)


_TAG = "tag:yaml.org,2002:"
_CoreLoader.add_implicit_resolver(
    _TAG + "null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)
_CoreLoader.add_implicit_resolver(
    _TAG + "bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_CoreLoader.add_implicit_resolver(
    _TAG + "int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_CoreLoader.add_implicit_resolver(
    _TAG + "float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _line(mark: Any) -> int:
    return int(mark.line) + 1


def _scalar(node: ScalarNode, key: str, source: str) -> Any:
    tag, text = node.tag, node.value
    if tag == _TAG + "str":
        return text
    if tag == _TAG + "null":
        return None
    if tag == _TAG + "bool":
        return text.lower() == "true"
    if tag == _TAG + "int":
        if text.startswith(("0o", "0x")):
            return int(text, 0)
        return int(text, 10)
    if tag == _TAG + "float":
        lowered = text.lower()
        if lowered.endswith(".inf"):
            return -math.inf if lowered.startswith("-") else math.inf
        if lowered.endswith(".nan"):
            return math.nan
        return float(text)
    raise PolicyError(
        f"unsupported YAML tag {tag!r}", source=source, line=_line(node.start_mark), key=key or None
    )


def _from_yaml(node: Any, key: str, line: int, source: str) -> Node:
    if isinstance(node, MappingNode):
        entries: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key_line = _line(key_node.start_mark)
            if not isinstance(key_node, ScalarNode):
                raise PolicyError(
                    "mapping keys must be plain names",
                    source=source,
                    line=key_line,
                    key=key or None,
                )
            name = key_node.value
            child_key = f"{key}.{name}" if key else name
            if name in entries:
                raise PolicyError("duplicate key", source=source, line=key_line, key=child_key)
            entries[name] = _from_yaml(value_node, child_key, key_line, source)
        return Node(entries, line, key, source)
    if isinstance(node, SequenceNode):
        items = [
            _from_yaml(item, f"{key}[{i}]", _line(item.start_mark), source)
            for i, item in enumerate(node.value)
        ]
        return Node(items, line, key, source)
    return Node(_scalar(node, key, source), line, key, source)


def parse_yaml(text: str, source: str) -> Node:
    """The located tree of a YAML document (an empty file reads as ``null``)."""
    try:
        root = yaml.compose(text, Loader=_CoreLoader)  # type: ignore[arg-type]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        line = _line(mark) if mark is not None else None
        raise PolicyError(f"not valid YAML: {problem}", source=source, line=line) from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"not valid YAML: {exc}", source=source) from exc
    if root is None:
        return Node(None, 1, "", source)
    return _from_yaml(root, "", _line(root.start_mark), source)


# -- JSON --------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


class _JsonLocator:
    """Walks JSON text already known to be valid, recording each value's line."""

    _WS = re.compile(r"[ \t\n\r]*")
    _NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_at(self, index: int) -> int:
        return bisect.bisect_left(self.newlines, index) + 1

    def skip(self, index: int) -> int:
        return self._WS.match(self.text, index).end()  # type: ignore[union-attr]

    def value(self, index: int, key: str, line: int) -> tuple[Node, int]:
        ch = self.text[index]
        if ch == "{":
            return self.object(index, key, line)
        if ch == "[":
            return self.array(index, key, line)
        if ch == '"':
            text, end = _scanstring(self.text, index + 1)
            return Node(text, line, key, self.source), end
        for literal, value in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(literal, index):
                return Node(value, line, key, self.source), index + len(literal)
        match = self._NUMBER.match(self.text, index)
        assert match is not None, "validated by json.loads"
        number: int | float = (
            float(match.group()) if match.group(1) or match.group(2) else int(match.group())
        )
        return Node(number, line, key, self.source), match.end()

    def object(self, index: int, key: str, line: int) -> tuple[Node, int]:
        entries: dict[str, Node] = {}
        index = self.skip(index + 1)
        if self.text[index] == "}":
            return Node(entries, line, key, self.source), index + 1
        while True:
            key_line = self.line_at(index)
            name, index = _scanstring(self.text, index + 1)
            child_key = f"{key}.{name}" if key else name
            if name in entries:
                raise PolicyError("duplicate key", source=self.source, line=key_line, key=child_key)
            index = self.skip(self.skip(index) + 1)  # past ':'
            entries[name], index = self.value(index, child_key, key_line)
            index = self.skip(index)
            if self.text[index] == "}":
                return Node(entries, line, key, self.source), index + 1
            index = self.skip(index + 1)  # past ','

    def array(self, index: int, key: str, line: int) -> tuple[Node, int]:
        items: list[Node] = []
        index = self.skip(index + 1)
        if self.text[index] == "]":
            return Node(items, line, key, self.source), index + 1
        while True:
            item, index = self.value(index, f"{key}[{len(items)}]", self.line_at(index))
            items.append(item)
            index = self.skip(index)
            if self.text[index] == "]":
                return Node(items, line, key, self.source), index + 1
            index = self.skip(index + 1)


def parse_json(text: str, source: str) -> Node:
    """The located tree of a JSON document; duplicate keys are errors."""
    try:
        json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"not valid JSON: {exc.msg}", source=source, line=exc.lineno) from exc
    except ValueError as exc:
        raise PolicyError(f"not valid JSON: {exc}", source=source) from exc
    locator = _JsonLocator(text, source)
    start = locator.skip(0)
    node, _ = locator.value(start, "", locator.line_at(start))
    return node


def looks_like_json(text: str) -> bool:
    return text.lstrip().startswith(("{", "["))
