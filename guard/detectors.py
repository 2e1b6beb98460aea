"""A maintained secret detector as a second net: the plugins of Yelp's detect-secrets.

``find(text)`` runs every plugin detect-secrets ships (its public plugin
classes, through ``analyze_line``, under its default settings — which
verify nothing over the network) and returns the secret values they report.
``redact_words`` then replaces each whitespace-delimited word that holds
one, because some plugins report only part of a token (GitLab's reports
``glpat``).

The plugins use Python's backtracking ``re``, and some are far from linear
on hostile text (``IbmCloudIamDetector`` is cubic in a run of spaces: 800
spaces took 8 s). So they never see more than ``PIECE_CHARS`` at a time:
whitespace runs are collapsed to one space and the text is cut into
overlapping pieces of a few words. Worst case per piece is a constant, so
the whole is linear in the text; callers bound the text as well.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

# Longest text handed to a plugin at once.
PIECE_CHARS = 160
# Words a piece shares with the next, so "password = value" spanning a seam is seen whole.
OVERLAP_WORDS = 3
# Plugins left out: public IP addresses are not secrets, and the audit trail needs them.
EXCLUDED = frozenset({"IPPublicDetector"})
# Shorter reported values are prefixes or noise, not secrets on their own.
MIN_VALUE_CHARS = 4


@functools.cache
def plugins() -> tuple[Any, ...]:
    """One instance of every detect-secrets plugin (loaded once, on first use)."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    found = []
    for cls in get_mapping_from_secret_type_to_class().values():
        if cls.__name__ in EXCLUDED:
            continue
        found.append(cls())
    return tuple(found)


def _pieces(text: str) -> list[str]:
    words = [w[:PIECE_CHARS] for w in text.split()]
    pieces: list[str] = []
    i = 0
    while i < len(words):
        size, j = 0, i
        while j < len(words) and (j == i or size + len(words[j]) + 1 <= PIECE_CHARS):
            size += len(words[j]) + 1
            j += 1
        pieces.append(" ".join(words[i:j]))
        if j >= len(words):
            break
        i = max(i + 1, j - OVERLAP_WORDS)
    return pieces


def find(text: str) -> set[str]:
    """Secret values the detect-secrets plugins report in ``text``."""
    found: set[str] = set()
    for piece in _pieces(text):
        for plugin in plugins():
            try:
                secrets = plugin.analyze_line(filename="taskwarden-arguments", line=piece, line_number=0)
            except Exception:  # a plugin bug must not stop redaction by the others
                logger.debug("detect-secrets plugin %s failed", type(plugin).__name__, exc_info=True)
                continue
            for secret in secrets:
                value = secret.secret_value
                if isinstance(value, str) and len(value) >= MIN_VALUE_CHARS:
                    found.add(value)
    return found


def redact_words(text: str, values: set[str], replacement: str) -> str:
    """``text`` with every whitespace-delimited word that contains one of ``values`` replaced."""
    if not values:
        return text
    spans: list[tuple[int, int]] = []
    for value in values:
        start = text.find(value)
        while start >= 0:
            end = start + len(value)
            while start > 0 and not text[start - 1].isspace():
                start -= 1
            while end < len(text) and not text[end].isspace():
                end += 1
            spans.append((start, end))
            start = text.find(value, end)
    spans.sort()
    pieces: list[str] = []
    last = 0
    for start, end in spans:
        if start < last:  # overlaps a word already replaced
            start = last
            if end <= last:
                continue
        pieces += (text[last:start], replacement)
        last = end
    pieces.append(text[last:])
    return "".join(pieces)
