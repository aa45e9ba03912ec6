"""Greentext: a 4chan-style story told in short lines, every one starting with '>'.

Pass rule: at least one line, and every non-empty line starts with '>' (leading spaces allowed) with
some text after it. The diagnostics give the fraction of '>' lines, which is the softer measure: in the
OCR'd r/wholesomegreentext texts many lines are screenshots' line wraps, so about 45% of the
human-verified ones fail the strict rule while still being greentexts (see the report in tests).
`GreentextForm(min_fraction=0.8)` builds a lenient validator for such data.
"""

from __future__ import annotations

from pocketlm.eval.forms import Form, FormResult, normalize_newlines, register_form


@register_form
class GreentextForm(Form):
    name = "greentext"
    generation_stop = ("\n\n", "\n\r\n")  # samples are separated by blank lines (LF or CRLF)
    description = "greentext: every line starts with '>'"

    def __init__(self, min_fraction: float = 1.0) -> None:
        self.min_fraction = min_fraction

    def validate(self, text: str) -> FormResult:
        lines = [line.strip() for line in normalize_newlines(text).split("\n") if line.strip()]
        green = [line for line in lines if line.startswith(">")]
        empty = [i + 1 for i, line in enumerate(lines) if line.startswith(">") and not line.lstrip(">").strip()]
        other = [(i + 1, line) for i, line in enumerate(lines) if not line.startswith(">")]
        fraction = len(green) / len(lines) if lines else 0.0
        problems = []
        if not lines:
            problems.append("empty text")
        elif fraction < self.min_fraction:
            where = ", ".join(f"{n}: {line[:40]!r}" for n, line in other[:3])
            problems.append(f"{len(other)} of {len(lines)} lines do not start with '>' ({where})")
        if lines and not lines[0].startswith(">"):
            problems.append("the first line does not start with '>'")
        if empty and len(empty) == len(green):
            problems.append("the '>' lines are empty")
        diagnostics = {
            "lines": len(lines),
            "greentext_lines": len(green),
            "greentext_fraction": fraction,
            "empty_greentext_lines": len(empty),
            "other_lines": [n for n, _ in other],
        }
        return FormResult(passed=not problems, diagnostics=diagnostics, problems=problems)
