"""Message bodies as HTML a person can safely see.

Bodies are stored as given, Markdown or HTML. Showing one: Markdown → HTML
(markdown-it-py, CommonMark; raw HTML in the Markdown passes through to the
next step) → ``nh3`` with a small allow-list. nh3 (the ammonia sanitiser)
parses like a browser, so mutation tricks (``<math><mtext><table><mglyph>
<style>…``) and entity-encoded schemes (``&#106;avascript:``) end up as
text. Links keep only http, https and mailto URLs and get
``rel="noopener noreferrer"``. Only the output of ``render`` is ever marked
safe in the templates; everything else is autoescaped.
"""

from __future__ import annotations

import json
from typing import Any

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

ALLOWED_TAGS = frozenset(
    {"p", "br", "hr", "strong", "b", "em", "i", "code", "pre", "ul", "ol", "li", "a", "blockquote",
     "h1", "h2", "h3", "h4", "del"}
)  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}
URL_SCHEMES = frozenset({"http", "https", "mailto"})

# Dropped with their content (other tags outside the allow-list keep their text).
DROPPED_WITH_CONTENT = frozenset(
    {"script", "style", "template", "noscript", "textarea", "title", "xmp", "iframe", "noembed", "noframes",
     "object", "embed"}
)  # fmt: skip

# CommonMark, raw HTML allowed through to nh3; images stay as text (not in the allow-list).
_markdown = MarkdownIt("commonmark", {"html": True}).disable("image")


def sanitize(html: str) -> str:
    return nh3.clean(
        html,
        tags=set(ALLOWED_TAGS),
        clean_content_tags=set(DROPPED_WITH_CONTENT),
        attributes={tag: set(names) for tag, names in ALLOWED_ATTRIBUTES.items()},
        url_schemes=set(URL_SCHEMES),
        link_rel="noopener noreferrer",
        strip_comments=True,
    )


def render(body: str | None) -> Markup:
    """A message body (Markdown or HTML) as sanitised HTML."""
    if not body:
        return Markup("")
    return Markup(sanitize(_markdown.render(body)))


def pretty_json(value: Any) -> str:
    """Arguments as indented JSON text (escaped by the template, never marked safe)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def one_line_json(value: Any, width: int = 120) -> str:
    """Arguments on one line, cut to ``width`` characters (the audit table's summary)."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(", ", ": "), default=str)
    return text if len(text) <= width else text[: width - 1] + "…"
