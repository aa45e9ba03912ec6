"""Screenplays in Fountain (https://fountain.io) plain-text markup.

Elements recognised, following the Fountain spec:
- title page: `Key: value` lines at the very top, up to the first blank line;
- scene heading: after a blank line, starts with INT, EXT, EST, INT./EXT, INT/EXT or I/E (then `.` or a
  space), or is forced with a leading `.`; the time of day follows a ` - ` or `--` (EXT. PARK--DAY);
- character cue: after a blank line, an upper-case name (letters required, an extension such as (V.O.)
  or (CONT'D) allowed, `@` forces one) followed directly by a non-blank line;
- dialogue: the lines after a cue up to the next blank line; `(…)` lines in it are parentheticals;
- transition: after a blank line, upper case ending in `TO:`, or FADE IN/OUT, or forced with `>`
  (`> text <` is centred text, not a transition);
- everything else is action. Notes `[[…]]` and boneyard `/* … */` are ignored.

Pass rule: at least one scene heading, every scene heading has a time of day, and at least one
dialogue block (a character cue with dialogue).
"""

from __future__ import annotations

import re

from pocketlm.eval.forms import Form, FormResult, normalize_newlines, register_form

_HEADING = re.compile(r"^(?:INT\.?/EXT|INT/EXT|I/E|INT|EXT|EST)[. ]", re.IGNORECASE)
_TIMES = ("DAY", "NIGHT", "MORNING", "AFTERNOON", "EVENING", "DAWN", "DUSK", "SUNRISE", "SUNSET", "NOON",
          "MIDNIGHT", "LATER", "CONTINUOUS", "SAME", "SAME TIME", "MOMENTS LATER", "MOMENTS BEFORE",
          "LATE NIGHT", "EARLY MORNING", "NIGHTTIME", "DAYTIME", "TWILIGHT", "MAGIC HOUR")
_TIME_SPLIT = re.compile(r"\s+[-\u2013\u2014]+\s+|--+|\s[-\u2013\u2014]\s?")
_TITLE_KEY = re.compile(r"^[A-Za-z][A-Za-z ]*:")
_CUE_EXTENSION = re.compile(r"\s*\([^)]*\)\s*$")
_TRANSITION = re.compile(r"^(?:[A-Z0-9 .'’-]+TO:|FADE (?:IN|OUT)[:.]?|FADE TO BLACK\.?|CUT TO BLACK\.?)$")


def _strip_notes(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    return re.sub(r"\[\[.*?\]\]", "", text, flags=re.DOTALL)


def time_of_day(heading: str) -> str | None:
    """The time of day of a scene heading (EXT. PARK--DAY -> DAY), or None."""
    parts = _TIME_SPLIT.split(heading.strip().lstrip("."))
    if len(parts) < 2:
        return None
    tail = parts[-1].strip(" .").upper()
    tail = re.sub(r"^\((.*)\)$", r"\1", tail).strip()
    for t in sorted(_TIMES, key=len, reverse=True):
        if tail == t or tail.startswith(t + " ") or tail.endswith(" " + t):
            return t
    return None


def _is_heading(line: str) -> bool:
    s = line.strip()
    return bool(_HEADING.match(s)) or (s.startswith(".") and len(s) > 1 and s[1].isalnum())


def _is_cue(line: str) -> bool:
    s = line.strip()
    if s.startswith("@") and len(s) > 1:
        return True
    name = _CUE_EXTENSION.sub("", s).rstrip("^ ").strip()
    return bool(re.search(r"[A-Z]", name)) and name == name.upper() and not name.endswith((":", ".", "!", "?"))


def _is_transition(line: str) -> bool:
    s = line.strip()
    if s.startswith(">"):
        return not s.endswith("<")
    return bool(_TRANSITION.match(s))


def parse_fountain(text: str) -> list[tuple[str, str]]:
    """(element type, text) pairs: title, heading, transition, centered, cue, parenthetical, dialogue, action."""
    lines = _strip_notes(normalize_newlines(text)).split("\n")
    elements: list[tuple[str, str]] = []
    i = 0
    if lines and _TITLE_KEY.match(lines[0]):  # title page: up to the first blank line
        while i < len(lines) and lines[i].strip():
            elements.append(("title", lines[i].strip()))
            i += 1
    previous_blank = True
    in_dialogue = False
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        i += 1
        if not s:
            previous_blank, in_dialogue = True, False
            continue
        if in_dialogue:
            kind = "parenthetical" if s.startswith("(") and s.endswith(")") else "dialogue"
        elif previous_blank and _is_heading(s):
            kind = "heading"
        elif previous_blank and s.startswith(">") and s.endswith("<"):
            kind = "centered"
        elif previous_blank and _is_transition(s):
            kind = "transition"
        elif previous_blank and nxt and _is_cue(s):
            kind, in_dialogue = "cue", True
        else:
            kind = "action"
        elements.append((kind, s))
        previous_blank = False
    return elements


@register_form
class ScreenplayForm(Form):
    name = "screenplay"
    description = "Fountain screenplay: INT./EXT. scene headings with a time of day, character cues, dialogue"

    def split_samples(self, text: str) -> list[str]:
        """A plain-text file is one screenplay: Fountain separates its own elements by blank lines."""
        return [text.strip("\n")] if text.strip() else []

    def first_sample(self, text: str) -> str:
        return text

    def validate(self, text: str) -> FormResult:
        elements = parse_fountain(text)
        headings = [t for k, t in elements if k == "heading"]
        untimed = [h for h in headings if time_of_day(h) is None]
        cues = [t for k, t in elements if k == "cue"]
        blocks = sum(1 for j, (k, _) in enumerate(elements)
                     if k == "cue" and any(e[0] == "dialogue" for e in _block_after(elements, j)))
        problems = []
        if not headings:
            problems.append("no scene heading (INT./EXT. LOCATION - TIME)")
        if untimed:
            problems.append(f"{len(untimed)} scene heading(s) without a time of day, e.g. {untimed[0]!r}")
        if not blocks:
            problems.append("no dialogue (an upper-case character cue followed by the spoken lines)")
        diagnostics = {
            "scene_headings": len(headings),
            "headings_without_time": untimed,
            "character_cues": len(cues),
            "characters": sorted({_CUE_EXTENSION.sub("", c).lstrip("@").rstrip("^ ").strip() for c in cues}),
            "dialogue_blocks": blocks,
            "parentheticals": sum(k == "parenthetical" for k, _ in elements),
            "transitions": sum(k == "transition" for k, _ in elements),
            "action_lines": sum(k == "action" for k, _ in elements),
            "title_page": any(k == "title" for k, _ in elements),
        }
        return FormResult(passed=not problems, diagnostics=diagnostics, problems=problems)


def _block_after(elements: list[tuple[str, str]], j: int) -> list[tuple[str, str]]:
    out = []
    for kind, text in elements[j + 1:]:
        if kind not in ("dialogue", "parenthetical"):
            break
        out.append((kind, text))
    return out
