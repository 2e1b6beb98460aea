"""Scrub secrets from call arguments before anything is stored or shown.

Two nets, both applied by ``redact``:

1. **Keys.** A dict key that names a secret has its value replaced by
   ``[REDACTED]`` (whatever the value; ``None`` and booleans are kept, they
   cannot hold a secret). Keys are split into words (separators ``_ - . :``
   and space, and camelCase) and lowercased; a key is secret when

   - its joined words contain one of ``password passwd passphrase secret
     apikey privatekey accesskey secretkey sessionkey signingkey
     encryptionkey credential cookie authorization authentication``
     (so ``api_key``, ``X-Api-Key``, ``client_secret``, ``set-cookie``,
     ``private_key``, ``credentials`` all match), or
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
   that look like credentials replaced, keeping the surrounding text:
   provider keys (``sk-…``, ``sk_live_…``/``pk_…``/``rk_…``, ``ghp_``/
   ``gho_``/``ghu_``/``ghs_``/``ghr_…``, ``github_pat_…``, ``xox[abposr]-…``,
   ``AKIA…``/``ASIA…``, ``AIza…``), JWTs, the token after ``Bearer`` and the
   credentials after an ``Authorization:`` header, ``password=…``-style
   assignments and ``scheme://user:password@`` URL credentials, PEM private
   key blocks, long hex (≥ 32 characters, letters and digits) and long
   base64/base64url runs (≥ 40 characters with upper case, lower case and
   digits; a run containing ``/`` counts only if one of its ``/``-separated
   parts is itself ≥ 16 such characters, so file paths survive).

   Trade-offs: git commit ids (40 hex) and sha256 digests are redacted;
   very long identifiers mixing cases and digits (``ParserV2ForTheLongestNames…``)
   can be too. Both only lose information, never leak it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

REDACTED = "[REDACTED]"

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
_WORD_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


@functools.lru_cache(maxsize=4096)  # argument names repeat from call to call
def is_secret_key(key: str) -> bool:
    """True when a dict key names a secret (see the module docstring for the rules)."""
    words = [w.lower() for w in _WORD_RE.findall(key)]
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


# -- values -------------------------------------------------------------------


@dataclass(frozen=True)
class _ValueRule:
    regex: re.Pattern[str]
    # Literal substrings, one of which every match contains: the regex runs
    # only when one is present (a C-speed ``in`` instead of a regex scan).
    triggers: tuple[str, ...] = ()
    # Triggers are looked for, and the regex matched, in the lower-cased text;
    # its spans are then cut from the original. (Regexes of these rules must
    # match lower case only; case-insensitive regexes run several times slower.)
    lower: bool = False
    keep: bool = False  # only group ``v`` is the secret; the rest of the match stays


def _rule(pattern: str, *triggers: str, lower: bool = False, keep: bool = False) -> _ValueRule:
    return _ValueRule(re.compile(pattern, re.DOTALL), triggers, lower, keep)


_B64_CHARS = r"A-Za-z0-9+/_\-"
# Applied in order; earlier rules' [REDACTED] is inert to later ones.
_VALUE_RULES: tuple[_ValueRule, ...] = (
    _rule(
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*PRIVATE KEY-----|.*\Z)",
        "-----BEGIN",
    ),
    _rule(
        r"\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?"
        r"(?:(?:bearer|basic|token|digest|negotiate)\s+)?(?P<v>[^\s\"',;]+)",
        "authorization", lower=True, keep=True,
    ),
    _rule(
        r"\bbearer\s+(?P<v>(?=\S*\d|\S{20})[a-z0-9._~+/-]{8,}=*)",
        "bearer", lower=True, keep=True,
    ),
    # password=…, api_key: "…", secret='…' (the name may end a longer one:
    # db_password=…). Matched in the lower-cased text (see redact_text).
    _rule(
        r"(?:pass(?:word|wd|phrase)|pwd|secret|token|(?:api|access|private)[_-]?key)"
        r"[\"']?\s*[:=]\s*(?P<v>\"[^\"\n]+\"|'[^'\n]+'|[^\s\"',;&]+)",
        "pass", "pwd", "secret", "token", "key", lower=True, keep=True,
    ),
    _rule(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]+:(?P<v>[^\s/@]+)@", "://", keep=True),
    # Provider prefixes. The literal comes first so the regex engine can jump
    # to it; the look-behind after it checks that it starts a word.
    _rule(r"sk-(?<![A-Za-z0-9]sk-)(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{16,}", "sk-"),
    _rule(r"[spr]k_(?<![A-Za-z0-9][spr]k_)(?=[A-Za-z0-9_]*\d)[A-Za-z0-9_]{16,}", "k_"),
    _rule(
        r"gh(?<![A-Za-z0-9]gh)(?:[pousr]_[A-Za-z0-9]{30,}|ithub_pat_[A-Za-z0-9_]{22,})",
        "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
    ),
    _rule(r"xox(?<![A-Za-z0-9]xox)[abposr]-[A-Za-z0-9-]{10,}", "xox"),
    _rule(r"A[KS]IA(?<![A-Za-z0-9]A[KS]IA)[0-9A-Z]{16}(?![0-9A-Za-z])", "AKIA", "ASIA"),
    _rule(r"AIza(?<![A-Za-z0-9]AIza)[0-9A-Za-z_-]{35}", "AIza"),
    _rule(r"eyJ(?<![A-Za-z0-9]eyJ)[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*", "eyJ"),
)
# Long runs of token characters; ``_long_run`` decides whether one is hex or base64.
_RUN_RE = re.compile(rf"(?<![{_B64_CHARS}=])[{_B64_CHARS}]{{32,}}=*")
_HEX_RE = re.compile(r"[0-9a-fA-F]{32,}")
_B64_PART_RE = re.compile(r"[A-Za-z0-9+_-]{16,}")


_UPPER_RE = re.compile("[A-Z]")
_LOWER_RE = re.compile("[a-z]")
_DIGIT_RE = re.compile("[0-9]")


def _mixed(s: str) -> bool:
    return bool(_DIGIT_RE.search(s) and _UPPER_RE.search(s) and _LOWER_RE.search(s))


def _long_run(run: str) -> bool:
    body = run.rstrip("=")
    if _HEX_RE.fullmatch(body):
        return bool(_DIGIT_RE.search(body)) and not body.isdigit()
    if len(body) < 40 or not _mixed(body):
        return False
    if "/" not in body:
        return True
    # A path is short words between slashes; an encoded secret has long mixed parts.
    return any(_mixed(part.group()) for part in _B64_PART_RE.finditer(body))


def _whole(m: re.Match[str]) -> str:
    return REDACTED


def _group_v(m: re.Match[str]) -> str:
    start, end = m.span("v")
    base = m.start()
    text = m.group()
    return text[: start - base] + REDACTED + text[end - base :]


def _run(m: re.Match[str]) -> str:
    return REDACTED if _long_run(m.group()) else m.group()


def _sub_lowered(rule: _ValueRule, text: str, low: str) -> str:
    if len(low) != len(text):
        # Lower-casing changed the length (e.g. "İ"): spans would not line up.
        ignorecase = re.compile(rule.regex.pattern, re.DOTALL | re.IGNORECASE)
        return ignorecase.sub(_group_v if rule.keep else _whole, text)
    pieces: list[str] = []
    last = 0
    for m in rule.regex.finditer(low):
        start, end = m.span("v") if rule.keep else m.span()
        pieces += (text[last:start], REDACTED)
        last = end
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


# Every rule's triggers, by the text they are looked for in.
_TRIGGERS = tuple(dict.fromkeys(t for rule in _VALUE_RULES if not rule.lower for t in rule.triggers))
_TRIGGERS_LOWER = tuple(dict.fromkeys(t for rule in _VALUE_RULES if rule.lower for t in rule.triggers))
# What redact_text relies on (see there).
assert not any(c in t for t in (*_TRIGGERS, *_TRIGGERS_LOWER) for c in "[]")


def redact_text(text: str) -> str:
    """``text`` with every substring that looks like a credential replaced."""
    if len(text) < 8:  # nothing shorter matches any pattern
        return text
    low: str | None = text.lower()
    # Which triggers occur, looked for once. Most strings hold none, and then
    # no rule can match. A replacement only ever removes triggers (no trigger
    # contains "[" or "]", so "[REDACTED]" neither holds one nor joins its
    # neighbours into one): a rule skipped here would have been skipped in
    # the text as it stands when its turn comes, and a rule run here whose
    # trigger an earlier rule removed finds nothing to replace.
    present = {t for t in _TRIGGERS if t in text}
    present_lower = {t for t in _TRIGGERS_LOWER if t in low}
    if not present and not present_lower:
        return _RUN_RE.sub(_run, text) if len(text) >= 32 else text
    for rule in _VALUE_RULES:
        if (present_lower if rule.lower else present).isdisjoint(rule.triggers):
            continue
        if rule.lower:
            if low is None:
                low = text.lower()
            replaced = _sub_lowered(rule, text, low)
        else:
            replaced = rule.regex.sub(_group_v if rule.keep else _whole, text)
        if replaced != text:
            text, low = replaced, None
    if len(text) >= 32:
        text = _RUN_RE.sub(_run, text)
    return text


def redact(value: Any) -> Any:
    """A deep copy of a JSON-like ``value`` with secret keys' values and secret-looking strings replaced.

    Mappings become dicts and tuples become lists; other objects are returned as they are.
    """
    return _redact(value, redact_text)


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
