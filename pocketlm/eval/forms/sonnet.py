"""The Shakespearean sonnet: 14 lines, rhymed ABAB CDCD EFEF GG, about ten syllables a line.

Calibrated on Shakespeare's own sonnets (sonnets.txt + the held-out ones), rhyme is graded by
`phonetics.rhyme_grade` and slant, historical and eye rhymes count (love/prove, come/doom, die/memory);
a strict perfect-rhyme test would fail about half of them. Pass rule:

- exactly 14 lines (after dropping a number or roman-numeral heading);
- at least 6 of the 7 rhyme pairs rhyme at some grade; at most one pair is the same word twice;
- at least 12 of the 14 lines have 8 to 12 syllables (feminine endings and elisions vary the count);
- no more than one line repeated (a model looping on one line is not a sonnet).

The diagnostics also say whether the strict test (all 7 pairs perfect or identical) would pass.
"""

from __future__ import annotations

import re

from pocketlm.eval.forms import Form, FormResult, normalize_newlines, register_form, split_on_blank_lines
from pocketlm.eval.forms.phonetics import final_word, line_syllables, rhyme_grade

LINES = 14
RHYME_PAIRS = [(0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 13)]  # ABAB CDCD EFEF GG
MIN_RHYMING_PAIRS = 6
MAX_IDENTICAL_PAIRS = 1
SYLLABLE_RANGE = (8, 12)
MIN_LINES_IN_METER = 12
MAX_REPEATED_LINES = 1

_NUMBER_LINE = re.compile(r"^\s*(?:\d+|[IVXLC]+)\.?\s*$")


def sonnet_lines(text: str) -> list[str]:
    """The verse lines: non-empty, stripped, without a leading number/roman-numeral heading."""
    lines = [line.strip() for line in normalize_newlines(text).split("\n") if line.strip()]
    while lines and _NUMBER_LINE.match(lines[0]):
        lines.pop(0)
    return lines


def split_sonnets(text: str) -> list[str]:
    """Sonnets in a plain-text file, in the layouts seen in practice:

    - numbered (Shakespeare's sonnets.txt, CS224N's files): a line holding only the number separates
      sonnets; a short preamble before the first number (a title/editor header) is dropped;
    - separated by runs of two or more blank lines;
    - separated by single blank lines, where stanzas split by blank lines (4+4+4+2) are merged back.
    """
    text = normalize_newlines(text)
    lines = text.split("\n")
    if any(_NUMBER_LINE.match(line) and line.strip() for line in lines):
        chunks, current = [], []
        for line in lines:
            if _NUMBER_LINE.match(line) and line.strip():
                chunks.append(current)
                current = []
            else:
                current.append(line)
        chunks.append(current)
        preamble, rest = chunks[0], chunks[1:]
        keep = [preamble] if len([x for x in preamble if x.strip()]) >= LINES - 2 else []
        return ["\n".join(c).strip("\n") for c in keep + rest if any(x.strip() for x in c)]
    if re.search(r"\n[ \t]*\n[ \t]*\n", text):
        chunks = re.split(r"\n(?:[ \t]*\n){2,}", text)
        return [c.strip("\n") for c in chunks if c.strip()]
    return _merge_stanzas(split_on_blank_lines(text))


def _merge_stanzas(chunks: list[str]) -> list[str]:
    out: list[str] = []
    group: list[str] = []
    group_lines = 0
    for chunk in chunks:
        n = len([x for x in chunk.split("\n") if x.strip()])
        if n <= 4 and (group or n < LINES) and group_lines + n <= LINES:
            group.append(chunk)
            group_lines += n
            if group_lines >= LINES:
                out.append("\n".join(group))
                group, group_lines = [], 0
            continue
        if group:
            out.append("\n".join(group))
            group, group_lines = [], 0
        out.append(chunk)
    if group:
        out.append("\n".join(group))
    return out


@register_form
class SonnetForm(Form):
    name = "sonnet"
    generation_stop = ("\n\n", "\n\r\n")  # samples are separated by blank lines (LF or CRLF)
    description = "Shakespearean sonnet: 14 lines, ABAB CDCD EFEF GG, about 10 syllables a line"

    def split_samples(self, text: str) -> list[str]:
        return split_sonnets(text)

    def validate(self, text: str) -> FormResult:
        lines = sonnet_lines(text)
        problems: list[str] = []
        if len(lines) != LINES:
            problems.append(f"has {len(lines)} lines; a sonnet has {LINES}")

        pairs = []
        for a, b in RHYME_PAIRS:
            if b >= len(lines):
                break
            wa, wb = final_word(lines[a]), final_word(lines[b])
            grade = rhyme_grade(wa, wb) if wa and wb else "none"
            pairs.append({"lines": [a + 1, b + 1], "words": [wa, wb], "grade": grade})
        rhyming = [p for p in pairs if p["grade"] != "none"]
        identical = [p for p in pairs if p["grade"] == "identical"]
        counted = len(rhyming) - max(0, len(identical) - MAX_IDENTICAL_PAIRS)
        if counted < MIN_RHYMING_PAIRS:
            missing = ", ".join(f"{p['lines'][0]}/{p['lines'][1]} ({p['words'][0]}/{p['words'][1]})"
                                for p in pairs if p["grade"] == "none")
            problems.append(f"only {counted} of {len(RHYME_PAIRS)} ABAB CDCD EFEF GG rhyme pairs rhyme"
                            + (f"; not rhyming: {missing}" if missing else ""))
        if len(identical) > MAX_IDENTICAL_PAIRS:
            problems.append(f"{len(identical)} rhyme pairs repeat the same word")

        counts = [line_syllables(line) for line in lines]
        lo, hi = SYLLABLE_RANGE
        off = [i + 1 for i, c in enumerate(counts) if not lo <= c <= hi]
        in_meter = len(counts) - len(off)
        if len(off) > LINES - MIN_LINES_IN_METER:
            problems.append(f"{len(off)} lines outside {lo}-{hi} syllables (lines {off[:6]})")

        repeated = len(lines) - len({line.lower() for line in lines})
        if repeated > MAX_REPEATED_LINES:
            problems.append(f"{repeated} lines are repeats of earlier lines")

        strict = len(pairs) == len(RHYME_PAIRS) and all(p["grade"] in ("perfect", "identical") for p in pairs)
        diagnostics = {
            "lines": len(lines),
            "rhyme_pairs": pairs,
            "rhyming_pairs": counted,
            "syllables": counts,
            "lines_in_meter": in_meter,
            "repeated_lines": repeated,
            "strict_rhyme": strict,
        }
        return FormResult(passed=not problems, diagnostics=diagnostics, problems=problems)
