"""docs/BENCHMARKS.md: the generated part is rewritten by each run, the prose around it kept."""

from __future__ import annotations

import time
from pathlib import Path

from bench.core import Section, fmt

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"

_INTRO = """\
# Benchmarks

`python -m bench` measures taskwarden on the machine it runs on and rewrites
the part of this page between the markers below; `python -m bench --quick` is
a smoke run of the same code with small sizes (CI runs it) and leaves this
page alone unless given `--out FILE`. Both print one JSON object as the last
line of stdout, progress goes to stderr.

The machines this runs on are shared and noisy, so every result is a median,
and comparisons are ratios measured side by side, interleaved, in one run.
Absolute numbers move from run to run by tens of percent; the ratios much
less.

"""

_NOTES = """
## Notes

(Analysis of the results, kept across runs: edit freely outside the markers.)
"""


def render(
    sections: list[Section], machine: list[tuple[str, str]], *, quick: bool, seconds: float
) -> str:
    lines = [
        START,
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m bench"
        f"{' --quick' if quick else ''}` in {seconds:.0f} s.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in machine),
        "",
        "## Results",
        "",
        "| metric | result | target | met |",
        "|---|---|---|---|",
    ]
    for section in sections:
        if section.error:
            lines.append(f"| {section.title} | **failed**: {section.error.splitlines()[0]} | | |")
        for m in section.metrics:
            met = {True: "yes", False: "**no**", None: ""}[m.met]
            note = f" ({m.note})" if m.note else ""
            lines.append(f"| `{m.key}`: {m.label} | {fmt(m.value)} {m.unit} | {m.target_text()}{note} | {met} |")
    for section in sections:
        lines += ["", f"## {section.title}", "", "**Method.** " + section.method, ""]
        if section.error:
            lines += ["**Failed:**", "", "```", section.error, "```"]
        else:
            lines += [f"**Results** ({section.seconds:.0f} s).", "", *section.details]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write(path: Path, generated: str) -> None:
    """Replace the generated part of ``path``, or create it with room for notes."""
    if path.exists():
        text = path.read_text()
        start, end = text.find(START), text.find(END)
        if start != -1 and end > start:
            path.write_text(text[:start] + generated.rstrip("\n") + text[end + len(END) :])
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_INTRO + generated + _NOTES)
