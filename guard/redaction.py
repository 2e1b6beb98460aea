"""Scrub secrets from call arguments before anything is stored or shown.

Everything here takes time linear in its input, and its input is bounded
first, because the input is whatever an agent sent:

0. **Bounds.** ``bound`` copies a value keeping at most ``MAX_STRING_CHARS``
   of each string and ``MAX_RECORD_CHARS`` of strings in all (keys
   included), ``MAX_DEPTH`` levels and ``MAX_ITEMS`` entries per container.
   A cut string ends with ``[… N more characters not stored]``; it is cut
   back to the last whitespace or punctuation before the limit, so no half
   of a secret is kept. ``redact`` bounds before it scans.

Then two nets, both applied by ``redact``:

1. **Keys.** A dict key that names a secret has its value replaced by
   ``[REDACTED]`` (whatever the value; ``None`` and booleans are kept, they
   cannot hold a secret). Keys are split into words (separators ``_ - . :``
   and space, and camelCase) and lowercased; a key is secret when

   - its joined words contain one of ``password passwd passphrase secret
     apikey privatekey accesskey secretkey sessionkey signingkey
     encryptionkey accountkey credential cookie authorization
     authentication`` (so ``api_key``, ``X-Api-Key``, ``client_secret``,
     ``set-cookie``, ``private_key``, ``credentials`` all match), or
   - one word is exactly ``auth``, ``pwd``, ``jwt`` or ``bearer``
     (``author`` and ``oauth_scopes`` do not match), or
   - a word is or ends in ``token`` (``token``, ``access_token``,
     ``refreshToken``, ``xsrftoken``) unless another word says it is a
     measure or a kind: ``max_tokens``, ``tokens_used``, ``token_count``,
     ``token_limit``, ``token_type`` are kept. Plural ``tokens`` alone is kept
     too: it usually counts something, and the value net still catches a
     real token inside it.

   Over-matching is accepted where it is cheap: ``PWD`` in an environment
   dict (the working directory) is redacted.

2. **Values.** Every string, anywhere (dict keys included), has substrings
   that look like credentials replaced, keeping the surrounding text. First
   taskwarden's own rules, on RE2 (linear time, no backtracking): PEM
   private key blocks; ``Authorization:`` headers and ``Bearer`` tokens;
   ``password=…``-style assignments and "the password is …" phrases;
   ``scheme://user:password@`` URL credentials; provider formats (OpenAI and
   Anthropic ``sk-…``, Stripe ``sk_live_…``/``pk_…``/``rk_…``, GitHub
   ``ghp_…``/``github_pat_…``, GitLab ``glpat-…`` and kin, Hugging Face
   ``hf_…``, Slack ``xox?-…`` and webhook URLs, AWS ``AKIA…``/``ASIA…``,
   Google ``AIza…``, JWTs, npm ``npm_…``, PyPI ``pypi-…``, Twilio ``SK…``);
   long hex (≥ 32 characters, letters and digits) and long base64/base64url
   runs (≥ 40 characters with upper case, lower case and digits, or with
   the entropy of random bytes; a run containing ``/`` counts only if one
   of its ``/``-separated parts is ≥ 16 such characters or the whole run
   looks random, so file paths survive). Then the plugins of Yelp's
   ``detect-secrets`` (``guard.detectors``), on the first
   ``DETECTOR_BUDGET`` characters of each record, in short pieces: every
   whitespace-delimited word holding a secret one of them finds is
   replaced.

   Trade-offs: git commit ids (40 hex) and sha256 digests are redacted;
   very long identifiers mixing cases and digits (``ParserV2ForTheLongestNames…``)
   can be too, and so can the word after "token is". These only lose
   information, never leak it.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import re2

from guard import detectors

REDACTED = "[REDACTED]"

# What one record keeps of an agent's arguments (see ``bound``).
MAX_STRING_CHARS = 4096
MAX_RECORD_CHARS = 16384
MAX_DEPTH = 32
MAX_ITEMS = 256
# How much of a record's text the detect-secrets plugins read (the RE2 rules read all of it).
DETECTOR_BUDGET = 4096

TRUNCATED = "[…]"

# -- keys ---------------------------------------------------------------------

_KEY_SUBSTRINGS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "apikey",
    "privatekey",
    "accesskey",
    "secretkey",
    "sessionkey",
    "signingkey",
    "encryptionkey",
    "accountkey",
    "credential",
    "cookie",
    "authorization",
    "authentication",
)
_KEY_WORDS = frozenset({"auth", "pwd", "jwt", "bearer"})
# Beside "token", these words make a key a measure or a kind, not a secret.
_TOKEN_HARMLESS = frozenset(
    {
        "count",
        "counts",
        "used",
        "usage",
        "limit",
        "limits",
        "max",
        "min",
        "budget",
        "total",
        "num",
        "number",
        "remaining",
        "estimate",
        "length",
        "len",
        "type",
        "types",
        "kind",
        "expires",
        "expiry",
        "ttl",
    }
)
# Python's re is safe here: no nested quantifiers, and keys are bounded first.
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


@functools.lru_cache(maxsize=4096)  # argument names repeat from call to call
def is_secret_key(key: str) -> bool:
    """True when a dict key names a secret (see the module docstring for the rules)."""
    words = [w.lower() for w in _WORD_RE.findall(key[:MAX_STRING_CHARS])]
    if not words:
        return False
    joined = "".join(words)
    if any(s in joined for s in _KEY_SUBSTRINGS):
        return True
    if any(w in _KEY_WORDS for w in words):
        return True
    if any(w.endswith("token") for w in words):
        return not any(w in _TOKEN_HARMLESS for w in words)
    return False


# -- bounds -------------------------------------------------------------------

# Characters a token (and so a secret) is made of; a cut backs off over them.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-.~%:@")


def _cut(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit``, else a prefix ending at a token boundary and a marker."""
    if len(text) <= limit:
        return text
    marker = f"[… {len(text):,} characters, the rest not stored]"
    end = max(0, limit - len(marker))
    while end and text[end - 1] in _TOKEN_CHARS:
        end -= 1
    return text[:end] + marker


class _Budget:
    def __init__(self, chars: int) -> None:
        self.chars = chars

    def take(self, text: str) -> str:
        kept = _cut(text, min(MAX_STRING_CHARS, max(self.chars, 0)))
        self.chars -= len(kept)
        return kept


def bound(value: Any, *, budget: int = MAX_RECORD_CHARS) -> Any:
    """A copy of a JSON-like ``value`` small enough to scan and store (see the module docstring).

    Time is linear in what is kept, not in the size of ``value``.
    """
    return _bound(value, _Budget(budget), 0)


def _bound(value: Any, budget: _Budget, depth: int) -> Any:
    if isinstance(value, str):
        return budget.take(value)
    if isinstance(value, Mapping) or isinstance(value, (list, tuple)):
        if depth >= MAX_DEPTH or budget.chars <= 0:
            return TRUNCATED
        if isinstance(value, Mapping):
            out: dict[Any, Any] = {}
            for i, (key, item) in enumerate(value.items()):
                if i >= MAX_ITEMS or budget.chars <= 0:
                    out[TRUNCATED] = f"{len(value) - i} more entries not stored"
                    break
                kept_key = budget.take(key) if isinstance(key, str) else key
                out[kept_key] = _bound(item, budget, depth + 1)
            return out
        items: list[Any] = []
        for i, item in enumerate(value):
            if i >= MAX_ITEMS or budget.chars <= 0:
                items.append(f"{TRUNCATED} {len(value) - i} more items not stored")
                break
            items.append(_bound(item, budget, depth + 1))
        return items
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return budget.take(str(value))


def text_size(value: Any, limit: int) -> int:
    """Characters of text in ``value`` (strings and keys), counted up to ``limit`` (then it stops)."""
    total = 0
    stack = [value]
    while stack and total < limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            for key, child in item.items():
                if isinstance(key, str):
                    total += len(key)
                stack.append(child)
                if total >= limit or len(stack) > limit:
                    break
        elif isinstance(item, (list, tuple)):
            stack.extend(item[:limit])
    return min(total, limit)


# -- values -------------------------------------------------------------------

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def _re2(pattern: str) -> Any:
    return re2.compile(pattern, _RE2_OPTIONS)


@dataclass(frozen=True)
class _ValueRule:
    regex: Any  # an RE2 pattern: linear time whatever the text
    # Literal substrings (in the lower-cased text), one of which every match
    # contains: the regex runs only when one is present.
    triggers: tuple[str, ...]
    # Only group ``v`` is the secret; the rest of the match stays.
    keep: bool = False
    # Extra test on the secret; False keeps it (RE2 has no look-arounds).
    check: Callable[[str], bool] | None = None


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _bearer_like(s: str) -> bool:
    return _has_digit(s) or len(s) >= 20


_SK = r"(?:^|[^A-Za-z0-9])(?P<v>"
_PROVIDERS = "|".join(
    (
        r"sk-[A-Za-z0-9_-]{16,}",
        r"[spr]k_[A-Za-z0-9_]{16,}",
        r"gh[pousr]_[A-Za-z0-9]{30,}",
        r"github_pat_[A-Za-z0-9_]{22,}",
        r"gl(?:pat|dt|rt|ptt|cbt|imt|ft|soat|agent|oas)-[A-Za-z0-9_-]{20,}",
        r"hf_[A-Za-z0-9]{30,}",
        r"xox[abposre]-[A-Za-z0-9-]{10,}",
        r"A[KS]IA[0-9A-Z]{16}",
        r"AIza[0-9A-Za-z_-]{35}",
        r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*",
        r"npm_[A-Za-z0-9]{36}",
        r"pypi-[A-Za-z0-9_-]{50,}",
        r"SK[0-9a-f]{32}",
        r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]+",
    )
)
_PROVIDER_TRIGGERS = (
    "sk-", "k_", "gh", "gl", "hf_", "xox", "akia", "asia", "aiza", "eyj", "npm_", "pypi-", "sk", "hooks.slack",
)  # fmt: skip


def _provider_ok(s: str) -> bool:
    # sk-… and sk_… are secrets only with a digit ("sk-learn-and-other-words" is not).
    if s.startswith("sk-") or s[1:3] == "k_":
        return _has_digit(s)
    return True


_SECRET_NAMES = (
    r"pass(?:word|wd|phrase)|pwd|secret|token|"
    r"(?:api|access|private|secret|account|shared[_-]?access|client|signing|encryption|master)[_-]?key"
)
# A quoted value may have lost its closing quote to a cut.
_VALUE = r"(?P<v>\"[^\"\n]*\"?|'[^'\n]*'?|[^\s\"',;&]+)"

# Applied in order; earlier rules' [REDACTED] is inert to later ones.
_VALUE_RULES: tuple[_ValueRule, ...] = (
    _ValueRule(
        _re2(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?s:.*?)(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)"),
        ("-----begin",),
    ),
    _ValueRule(
        _re2(
            r"(?i)\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?"
            r"(?:(?:bearer|basic|token|digest|negotiate)\s+)?(?P<v>[^\s\"',;]+)"
        ),
        ("authorization",),
        keep=True,
    ),
    _ValueRule(_re2(r"(?i)\bbearer\s+(?P<v>[a-z0-9._~+/-]{8,}=*)"), ("bearer",), keep=True, check=_bearer_like),
    # password=…, api_key: "…", secret='…' (the name may end a longer one: db_password=…).
    _ValueRule(
        _re2(rf"(?i)(?:{_SECRET_NAMES})[\"']?\s*[:=]\s*{_VALUE}"),
        ("pass", "pwd", "secret", "token", "key"),
        keep=True,
    ),
    # "the password is hunter2", "my API key was …", "passcode for the vault is …"
    _ValueRule(
        _re2(
            r"(?i)\b(?:password|passphrase|passcode|passwd|pwd|pin|secret|api[ _-]?key|token)"
            r"(?:\s+for\s+[^\s]{1,64})?\s+(?:is|was)\s*:?\s+" + _VALUE
        ),
        ("pass", "pwd", "pin", "secret", "key", "token"),
        keep=True,
    ),
    _ValueRule(_re2(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+:(?P<v>[^\s/@]+)@"), ("://",), keep=True),
    _ValueRule(_re2(_SK + _PROVIDERS + ")"), _PROVIDER_TRIGGERS, keep=True, check=_provider_ok),
)
# Long runs of token characters; ``_long_run`` decides whether one is hex or base64.
_RUN_RE = _re2(r"[A-Za-z0-9+/_\-]{32,}=*")
_HEX_CHARS = frozenset("0123456789abcdefABCDEF")
_PART_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+_-")
# Bits per character above which a run reads as random bytes (paths and names
# stay near 4; 40 random base64 characters are 4.5 to 5).
RANDOM_ENTROPY = 4.4


def _mixed(s: str) -> bool:
    return any(c.isdigit() for c in s) and any(c.isupper() for c in s) and any(c.islower() for c in s)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(k / n * math.log2(k / n) for k in Counter(s).values())


def _long_run(run: str) -> bool:
    body = run.rstrip("=")
    if len(body) >= 32 and all(c in _HEX_CHARS for c in body):
        return _has_digit(body) and not body.isdigit()
    if len(body) < 40:
        return False
    if _entropy(body) >= RANDOM_ENTROPY:
        return True
    if not _mixed(body):
        return False
    if "/" not in body:
        return True
    # A path is short words between slashes; an encoded secret has long mixed parts.
    return any(len(part) >= 16 and _mixed(part) and set(part) <= _PART_CHARS for part in body.split("/"))


def _apply(rule: _ValueRule, text: str) -> str:
    pieces: list[str] = []
    last = 0
    group = rule.regex.groupindex["v"] if rule.keep else 0  # RE2 spans take numbers only
    for m in rule.regex.finditer(text):
        start, end = m.span(group)
        if start < 0 or (rule.check is not None and not rule.check(text[start:end])):
            continue
        pieces += (text[last:start], REDACTED)
        last = end
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def _redact_runs(text: str) -> str:
    pieces: list[str] = []
    last = 0
    for m in _RUN_RE.finditer(text):
        if _long_run(m.group()):
            pieces += (text[last : m.start()], REDACTED)
            last = m.end()
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def _own_rules(text: str) -> str:
    if len(text) < 8:  # nothing shorter matches any rule
        return text
    low = text.lower()
    for rule in _VALUE_RULES:
        # A replacement only removes triggers ("[REDACTED]" holds none), so
        # a rule whose trigger is absent now would find nothing later either.
        if any(t in low for t in rule.triggers):
            replaced = _apply(rule, text)
            if replaced != text:
                text, low = replaced, replaced.lower()
    if len(text) >= 32:
        text = _redact_runs(text)
    return text


def redact_text(text: str, *, detector_budget: list[int] | None = None) -> str:
    """``text`` (cut to ``MAX_STRING_CHARS``) with every substring that looks like a credential replaced.

    ``detector_budget`` (one mutable count shared by a record's strings) is
    how many more characters the detect-secrets plugins may read.
    """
    text = _own_rules(_cut(text, MAX_STRING_CHARS))
    budget = detector_budget if detector_budget is not None else [DETECTOR_BUDGET]
    if len(text) >= 8 and budget[0] > 0:
        scanned = text[: budget[0]]
        budget[0] -= len(scanned)
        text = detectors.redact_words(text, detectors.find(scanned), REDACTED)
    return text


def redact(value: Any) -> Any:
    """A bounded deep copy of a JSON-like ``value`` with secret keys' values and secret-looking strings replaced.

    Mappings become dicts and tuples become lists; other objects become strings.
    """
    budget = [DETECTOR_BUDGET]
    return _redact(bound(value), lambda s: redact_text(s, detector_budget=budget))


# Values with at most this much text are redacted on the calling thread.
INLINE_TEXT_CHARS = 1024


async def redact_off_loop(value: Any) -> Any:
    """``redact(value)``, on a worker thread when ``value`` holds much text (the
    detector's plugins are Python and take milliseconds), so an event loop
    keeps serving others meanwhile."""
    if text_size(value, INLINE_TEXT_CHARS + 1) <= INLINE_TEXT_CHARS:
        return redact(value)
    return await anyio.to_thread.run_sync(redact, value)


def _redact(value: Any, text: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return text(value)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(key, str):
                secret = is_secret_key(key)
                key = text(key)
                while key in out:  # two keys that redact alike keep both values
                    key += "'"
            else:
                secret = False
            if secret and item is not None and not isinstance(item, bool):
                out[key] = REDACTED
            else:
                out[key] = _redact(item, text)
        return out
    if isinstance(value, (list, tuple)):
        return [_redact(item, text) for item in value]
    return value
