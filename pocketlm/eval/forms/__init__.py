"""Form validators: does a text have the shape of a sonnet, a screenplay, a greentext?

Each form is a `Form` subclass in its own module, registered with `@register_form`; adding a form is a
new module plus its name in `_BUILTIN` (or a `register_form` call from anywhere), with no change to the
others. A form answers two questions:

- `split_samples(text)`: how a plain-text file holds several samples (blank lines, numbered sonnets, ...).
- `validate(text)`: a `FormResult` with `passed`, form-specific `diagnostics` and the `problems` found.

`validate_samples` runs a form over many texts and gives the pass rate plus every sample's diagnostics.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.eval.jsonl import jsonl_rows


@dataclass
class FormResult:
    passed: bool
    diagnostics: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Form:
    """A text form. Subclasses set `name` and `description` and implement `validate`."""

    name: str = ""
    description: str = ""
    # Where a generation of one sample ends, for samplers that can stop early (the training-time check).
    generation_stop: tuple[str, ...] = ()

    def validate(self, text: str) -> FormResult:
        raise NotImplementedError

    def split_samples(self, text: str) -> list[str]:
        """Samples in a plain-text file: by default, separated by blank lines."""
        return split_on_blank_lines(text)

    def first_sample(self, text: str) -> str:
        """The part of a generation that a validator should judge: the first sample it contains
        (a model may run on into the next sonnet or greentext)."""
        samples = self.split_samples(text)
        return samples[0] if samples else text


_FORMS: dict[str, Form] = {}
# Built-in forms: name -> module that registers it (imported on first use).
_BUILTIN = {
    "sonnet": "pocketlm.eval.forms.sonnet",
    "screenplay": "pocketlm.eval.forms.screenplay",
    "greentext": "pocketlm.eval.forms.greentext",
}


def register_form(cls: type[Form]) -> type[Form]:
    """Class decorator: make `cls()` available as `get_form(cls.name)`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    _FORMS[cls.name] = cls()
    return cls


def form_names() -> list[str]:
    return sorted(set(_FORMS) | set(_BUILTIN))


def get_form(name: str) -> Form:
    if name not in _FORMS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _FORMS:
        raise UserError(f"unknown form {name!r}: choose one of {', '.join(form_names())}")
    return _FORMS[name]


# -- reading samples ------------------------------------------------------------------------------

def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_on_blank_lines(text: str) -> list[str]:
    chunks = re.split(r"\n[ \t]*\n", normalize_newlines(text))
    return [c.strip("\n") for c in chunks if c.strip()]


def _texts_from_json(data, path: Path) -> list[str]:
    items = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list or object of texts")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            item = item.get("text")
        if not isinstance(item, str):
            raise UserError(f"{path}: item {i} is not a string or an object with a string `text` field")
        out.append(item)
    return out


def read_texts(path: str | Path, form: Form) -> list[str]:
    """Samples from a file: JSONL (a `text` field per line), JSON (a list or object of texts),
    or plain text split by the form's rule; a directory gives one plain-text sample per file
    (e.g. a folder of .fountain screenplays; .md files are skipped), or its JSON/JSONL files' samples."""
    path = Path(path)
    if path.is_dir():
        out = []
        # Documentation beside data (README.md, SOURCE.md) is not a sample.
        children = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"]
        for child in sorted(children):
            if child.suffix in (".jsonl", ".json"):
                out.extend(read_texts(child, form))
            else:
                text = _read(child).strip("\n")
                if text.strip():
                    out.append(text)
        return out
    text = _read(path)
    if path.suffix == ".jsonl":
        return _jsonl_texts(text, path)
    if path.suffix == ".json":
        try:
            return _texts_from_json(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON ({exc}): give JSONL, JSON or plain text") from exc
    stripped = text.lstrip()
    if stripped.startswith("{") and _looks_like_jsonl(stripped):
        return _jsonl_texts(text, path)
    return form.split_samples(text)


def _read(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path} does not exist: give an existing file of texts")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text: {exc}") from exc


def _looks_like_jsonl(text: str) -> bool:
    first = text.split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _jsonl_texts(text: str, path: Path) -> list[str]:
    out = []
    for n, row in jsonl_rows(text.splitlines(), path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"{path}:{n} has no string `text` field: write lines like {{\"text\": \"...\"}}")
        out.append(row["text"])
    return out


def validate_samples(form: Form | str, texts: list[str]) -> dict:
    """Pass rate over `texts` plus each sample's result: {"pass_rate", "passed", "total", "samples"}."""
    form = get_form(form) if isinstance(form, str) else form
    samples = []
    for i, text in enumerate(texts):
        result = form.validate(text)
        samples.append({"index": i, **result.to_dict(), "text": text})
    passed = sum(s["passed"] for s in samples)
    return {
        "form": form.name,
        "pass_rate": passed / len(samples) if samples else float("nan"),
        "passed": passed,
        "total": len(samples),
        "samples": samples,
    }


__all__ = ["Form", "FormResult", "form_names", "get_form", "normalize_newlines", "read_texts",
           "register_form", "split_on_blank_lines", "validate_samples"]
