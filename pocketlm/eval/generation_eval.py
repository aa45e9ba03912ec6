"""Conditional generation scoring: complete each prompt, score the text against its reference.

Input is JSONL, one {"prompt": str, "reference": str} a line (an "id" is kept if present). The model
completes every prompt with the given sampling settings; the hypothesis scored is

- "auto" (default): prompt + completion when the reference starts with the prompt (the CS224N sonnet
  task: the reference is the whole sonnet, the prompt its opening lines), else the completion alone;
- "completion" or "prompt+completion" to choose explicitly.

Scores: corpus chrF (sacrebleu CHRF), optionally BLEU, degeneration metrics, and with a form the
form's pass rate on each generation's first sample. Every generation is returned beside its scores.
`sonnet_prompt_pairs` builds the sonnet JSONL from CS224N's held-out prompt and gold files.
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.eval import text_metrics
from pocketlm.eval.forms import Form, get_form, normalize_newlines
from pocketlm.eval.jsonl import jsonl_rows

HYPOTHESIS_MODES = ("auto", "completion", "prompt+completion")


def read_prompt_pairs(path: str | Path, limit: int | None = None, require_reference: bool = True) -> list[dict]:
    """Rows of a prompts JSONL file, checked: each has a string prompt (and reference)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a JSONL file with prompt and reference fields")
    rows = []
    for n, row in jsonl_rows(path.read_text(encoding="utf-8").splitlines(), path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{n} needs a string `prompt` field")
        ref = row.get("reference")
        if require_reference and not isinstance(ref, str):
            raise UserError(f"{path}:{n} needs a string `reference` field (the text to score against)")
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path} has no prompts")
    return rows


def hypothesis(prompt: str, completion: str, reference: str | None, mode: str = "auto") -> str:
    if mode not in HYPOTHESIS_MODES:
        raise UserError(f"unknown hypothesis mode {mode!r}: choose one of {', '.join(HYPOTHESIS_MODES)}")
    if mode == "prompt+completion" or (mode == "auto" and reference is not None and prompt.strip()
                                       and reference.strip().startswith(prompt.strip())):
        return prompt + completion
    return completion


def score_generations(rows: list[dict], *, form: Form | str | None = None, bleu: bool = False) -> dict:
    """Metrics of rows that hold "hypothesis" (and "reference"); adds per-row scores in place."""
    form = get_form(form) if isinstance(form, str) else form
    hyps = [r["hypothesis"] for r in rows]
    metrics: dict = {}
    scored = [r for r in rows if isinstance(r.get("reference"), str)]
    if scored:
        metrics["chrf"] = text_metrics.chrf([r["hypothesis"] for r in scored], [r["reference"] for r in scored])
        if bleu:
            metrics["bleu"] = text_metrics.bleu([r["hypothesis"] for r in scored], [r["reference"] for r in scored])
        for r in scored:
            r["chrf"] = text_metrics.sentence_chrf(r["hypothesis"], r["reference"])
    metrics.update(text_metrics.degeneration_metrics([r["completion"] for r in rows]))
    if form is not None:
        for r in rows:
            result = form.validate(form.first_sample(r["hypothesis"]))
            r["form"] = {"name": form.name, **result.to_dict()}
        metrics["form_pass_rate"] = sum(r["form"]["passed"] for r in rows) / len(rows) if rows else float("nan")
    metrics["generations"] = len(hyps)
    return metrics


def generate_completions(model, tokenizer, prompts: list[str], settings) -> list[str]:
    """One completion per prompt (the first sample when settings.num_samples > 1)."""
    from pocketlm.generate import generate

    return [generate(model, tokenizer, p, settings)[0] for p in prompts]


def evaluate_generation(model, tokenizer, rows: list[dict], settings, *, form: Form | str | None = None,
                        bleu: bool = False, mode: str = "auto") -> tuple[dict, list[dict]]:
    """Generate for every row, score; returns (metrics, generations with their per-row scores)."""
    if mode not in HYPOTHESIS_MODES:
        raise UserError(f"unknown hypothesis mode {mode!r}: choose one of {', '.join(HYPOTHESIS_MODES)}")
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], settings)
    out = []
    for i, (row, completion) in enumerate(zip(rows, completions)):
        ref = row.get("reference")
        out.append({"id": row.get("id", i), "prompt": row["prompt"], "reference": ref, "completion": completion,
                    "hypothesis": hypothesis(row["prompt"], completion, ref, mode)})
    return score_generations(out, form=form, bleu=bleu), out


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    from pocketlm.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -- sonnets (CS224N held-out layout) -------------------------------------------------------------

def _numbered_sonnets(path: Path) -> dict[str, list[str]]:
    """{number: verse lines} from a file where a line holding only a number opens each sonnet."""
    if not path.is_file():
        raise UserError(f"{path} does not exist: give the CS224N sonnet file")
    lines = normalize_newlines(path.read_text(encoding="utf-8")).split("\n")
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.strip().isdigit():
            current = out.setdefault(line.strip(), [])
        elif current is not None and line.strip():
            current.append(line.rstrip())
    return out


def sonnet_prompt_pairs(prompts_file: str | Path, gold_file: str | Path) -> list[dict]:
    """JSONL rows for the CS224N sonnet task: the held-out sonnet's opening lines (as given in
    `prompts_file`, e.g. sonnets_held_out_dev.txt) as the prompt, the whole sonnet (from `gold_file`,
    e.g. TRUE_sonnets_held_out_dev.txt) as the reference, matched by sonnet number."""
    prompts, gold = _numbered_sonnets(Path(prompts_file)), _numbered_sonnets(Path(gold_file))
    if not prompts:
        raise UserError(f"no numbered sonnets in {prompts_file}: sonnets must follow a line with their number")
    missing = [n for n in prompts if n not in gold]
    if missing:
        raise UserError(f"sonnets {', '.join(missing[:5])} of {prompts_file} are not in {gold_file}")
    rows = []
    for number, opening in prompts.items():
        reference = gold[number]
        if [x.strip() for x in reference[: len(opening)]] != [x.strip() for x in opening]:
            raise UserError(f"sonnet {number} in {gold_file} does not begin with its prompt lines")
        rows.append({"id": int(number), "prompt": "\n".join(opening) + "\n", "reference": "\n".join(reference)})
    return rows
