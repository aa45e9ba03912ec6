"""Where synth's prompts come from: a file of prompts, or a template with variables.

- A prompt file: `.txt` (one prompt per non-empty line) or `.jsonl` (a `prompt` field per line, or a JSON
  string per line; prompts may then hold newlines).
- A template file (`.yaml`, `.yml`, or `.json` with a `template` key):

      template: "Write a short greentext story about {topic}.\\n\\n{examples}\\n\\n"
      variables:
        topic: [a cat, a job interview, grandma's cooking]   # a list, or a file with one value a line
      examples:                                # few-shot examples drawn from a corpus, optional
        corpus: ../shared/data/greentext/wholesomegreentext_ocr_db.json
        form: greentext                        # how a plain-text corpus splits into samples (optional)
        k: 2
        separator: "\\n\\n"
        max_chars: 600                         # skip longer examples

  `{name}` names a variable (`{examples}` the few-shot block); any other brace is literal text. Sample i
  draws its values with a random generator seeded by (--seed, i), so a rerun renders the same prompts.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pocketlm.errors import UserError

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
TEMPLATE_SUFFIXES = (".yaml", ".yml")


@dataclass
class Examples:
    texts: list[str]
    k: int
    separator: str


@dataclass
class PromptSource:
    """Prompt i of a run: `source.prompt(i, seed)` -> (prompt, the variable values it used)."""

    prompts: list[str] = field(default_factory=list)  # a plain list, used round-robin
    template: str | None = None
    variables: dict[str, list[str]] = field(default_factory=dict)
    examples: Examples | None = None
    path: str = ""

    @property
    def count(self) -> int | None:
        """Distinct prompts of a list; None for a template (as many as asked)."""
        return None if self.template is not None else len(self.prompts)

    def prompt(self, index: int, seed: int) -> tuple[str, dict]:
        if self.template is None:
            return self.prompts[index % len(self.prompts)], {}
        rng = random.Random(f"{seed}:{index}")
        values: dict[str, str] = {}
        for name in _FIELD.findall(self.template):
            if name in values:
                continue
            if name == "examples" and self.examples is not None:
                chosen = rng.sample(self.examples.texts, min(self.examples.k, len(self.examples.texts)))
                values[name] = self.examples.separator.join(chosen)
            else:
                values[name] = rng.choice(self.variables[name])
        text = _FIELD.sub(lambda m: values[m.group(1)], self.template)
        return text, {k: v for k, v in values.items() if k != "examples"}


def load_prompts(path: str | Path) -> PromptSource:
    """A prompt file or a template file (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--prompts {path} does not exist: give a .txt/.jsonl file of prompts or a .yaml template")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --prompts {path} as UTF-8 text: {exc}") from None
    suffix = path.suffix.lower()
    if suffix in TEMPLATE_SUFFIXES or (suffix == ".json" and text.lstrip().startswith("{")):
        return _template(path, text)
    if suffix in (".jsonl", ".ndjson"):
        prompts = _jsonl_prompts(path, text)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompts: write one prompt per line")
    return PromptSource(prompts=prompts, path=str(path))


def _jsonl_prompts(path: Path, text: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}): write one JSON object "
                            "with a `prompt` field per line") from None
        value = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(value, str):
            raise UserError(f"{path} line {number} has no string `prompt` field: write lines like "
                            '{"prompt": "..."}')
        prompts.append(value)
    return prompts


def _template(path: Path, text: str) -> PromptSource:
    try:
        spec = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise UserError(f"template {path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("template"), str):
        raise UserError(f"template {path} needs a `template:` string, e.g. template: \"A poem about {{topic}}\"")
    unknown_keys = set(spec) - {"template", "variables", "examples"}
    if unknown_keys:
        raise UserError(f"template {path} has unknown keys {sorted(unknown_keys)}: use template, variables, "
                        "examples")
    variables = _variables(path, spec.get("variables") or {})
    examples = _examples(path, spec["examples"]) if spec.get("examples") else None
    known = set(variables) | ({"examples"} if examples else set())
    for name in _FIELD.findall(spec["template"]):
        if name not in known:
            raise UserError(f"template {path} uses the unknown variable {{{name}}}: define it under `variables:` "
                            f"(defined: {', '.join(sorted(known)) or 'none'})")
    return PromptSource(template=spec["template"], variables=variables, examples=examples, path=str(path))


def _variables(path: Path, raw) -> dict[str, list[str]]:
    if not isinstance(raw, dict):
        raise UserError(f"template {path}: `variables:` must map names to lists of values")
    out = {}
    for name, values in raw.items():
        if isinstance(values, str):  # a file of values, one per line, relative to the template
            values_path = (path.parent / values).expanduser()
            if not values_path.is_file():
                raise UserError(f"template {path}: variable {name!r} names the file {values_path}, which does not "
                                "exist: give a list or an existing file of values")
            values = [v for v in values_path.read_text(encoding="utf-8").splitlines() if v.strip()]
        if not isinstance(values, list) or not values:
            raise UserError(f"template {path}: variable {name!r} needs a non-empty list of values")
        out[str(name)] = [str(v) for v in values]
    return out


def _examples(path: Path, raw) -> Examples:
    from pocketlm.eval.forms import Form, get_form, read_texts

    if not isinstance(raw, dict) or "corpus" not in raw:
        raise UserError(f"template {path}: `examples:` needs a `corpus:` (a file or folder of texts)")
    corpus = (path.parent / str(raw["corpus"])).expanduser()
    if not corpus.exists():
        raise UserError(f"template {path}: examples corpus {corpus} does not exist")
    form = get_form(raw["form"]) if raw.get("form") else Form()
    texts = [t.strip() for t in read_texts(corpus, form) if t.strip()]
    max_chars = raw.get("max_chars")
    if max_chars:
        texts = [t for t in texts if len(t) <= int(max_chars)]
    k = int(raw.get("k", 2))
    if not texts or k < 1:
        raise UserError(f"template {path}: no examples to draw from {corpus} (k={k}, max_chars={max_chars})")
    return Examples(texts=texts, k=k, separator=str(raw.get("separator", "\n\n")))
