"""Policy files in three dialects, read into one ``guard.policy.Policy``.

``load_policy(path)`` reads a file; ``parse_policy(text, source_name)`` reads
text. The dialect is recognised from the document itself:

* ``all_tools``, or a tool entry with ``limits``/``require``/``deny_if`` →
  PolicyLayer JSON (``guard.dialects.policylayer_json``);
* a top-level ``description``, or a rule with ``name``, ``on_deny``,
  ``state``, ``action: evaluate`` or a string ``rate_limit`` ("5/hour") →
  Intercept (``guard.dialects.intercept``);
* anything else → taskwarden's own dialect, which includes PolicyLayer's
  catalogue format (``guard.dialects.taskwarden``).

Every problem raises ``PolicyError`` naming the file, the line and the key;
unknown keys are errors, so a typo cannot silently weaken a policy.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from guard.dialects import intercept, policylayer_json, taskwarden
from guard.dialects.source import Node, PolicyError, looks_like_json, parse_json, parse_yaml
from guard.policy import Dialect, Policy

logger = logging.getLogger(__name__)

DEFAULT_POLICY_RESOURCE = "default_policy.yaml"


def detect_dialect(root: Node) -> Dialect:
    """Which dialect a parsed document is written in."""
    top = root.mapping(what="a mapping of policy keys")
    if policylayer_json.looks_like(top):
        return "policylayer-json"
    marker = intercept.markers(top)
    if marker is not None:
        logger.debug(
            "%s: read as Intercept because of %s (line %s)", root.source, marker.key, marker.line
        )
        return "intercept"
    return "taskwarden"


_READERS = {
    "taskwarden": taskwarden.read,
    "intercept": intercept.read,
    "policylayer-json": policylayer_json.read,
}


def parse_document(text: str, source_name: str) -> Node:
    """The located tree of a policy (or cases) file: JSON if it looks like JSON, else YAML."""
    if source_name.lower().endswith(".json"):
        return parse_json(text, source_name)
    if looks_like_json(text):
        try:
            return parse_json(text, source_name)
        except PolicyError as json_error:
            # "{tools: {}}" is a YAML flow mapping, not JSON; outside a .json
            # file, report the JSON error only if YAML cannot read it either.
            try:
                return parse_yaml(text, source_name)
            except PolicyError:
                raise json_error from None
    return parse_yaml(text, source_name)


def parse_policy(text: str, source_name: str) -> Policy:
    """The policy ``text`` says; ``source_name`` names it in errors."""
    root = parse_document(text, source_name)
    if root.value is None:
        raise root.error("the policy is empty")
    dialect = detect_dialect(root)
    policy = _READERS[dialect](root)
    return policy.model_copy(update={"source": source_name})


def load_policy(path: str | Path) -> Policy:
    """The policy in the file at ``path``."""
    source_name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"not UTF-8 text: {exc.reason}", source=source_name) from exc
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror or exc}"
        raise PolicyError(message, source=source_name) from exc
    return parse_policy(text, source_name)


def load_default_policy() -> Policy:
    """The built-in policy used when no policy file is given (``guard/default_policy.yaml``)."""
    text = resources.files("guard").joinpath(DEFAULT_POLICY_RESOURCE).read_text(encoding="utf-8")
    return parse_policy(text, f"{DEFAULT_POLICY_RESOURCE} (built-in)")


__all__ = [
    "PolicyError",
    "detect_dialect",
    "load_default_policy",
    "load_policy",
    "parse_document",
    "parse_policy",
]
