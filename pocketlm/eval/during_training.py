"""Generation metrics at the training loop's evaluation steps (cfg.eval_prompts, cfg.eval_form).

Kept cheap, since it runs every `eval_every` steps: the first few prompts only (cfg.eval_num_prompts,
default 4), short greedy completions (cfg.eval_max_new_tokens, default 128: about one sonnet;
deterministic, so numbers from step to step compare) that stop where the form's sample ends (a blank
line for sonnets and greentexts), and metrics that need no second model. A prompt too long for the
model's context is skipped, never allowed to stop the training run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.eval.forms import get_form
from pocketlm.eval.generation_eval import hypothesis, read_prompt_pairs, score_generations

if TYPE_CHECKING:
    from pocketlm.recipe import TrainConfig

MAX_PROMPTS = 4
MAX_NEW_TOKENS = 128

_cache: dict[tuple[str, float], list[dict]] = {}


def _prompts(path: str) -> list[dict]:
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime if Path(path).exists() else 0.0)
    if key not in _cache:
        _cache[key] = read_prompt_pairs(path, require_reference=False)
    return _cache[key]


def evaluate_during_training(model, tokenizer, cfg: TrainConfig) -> dict:
    """{"chrf" (if the prompts have references), "form_pass_rate" (if cfg.eval_form), "distinct_2",
    "repeated_4gram_rate"} from greedy completions of the first prompts of cfg.eval_prompts."""
    from pocketlm.generate import SamplingSettings, generate

    path = cfg.eval_prompts
    if not path:
        return {}
    rows = _prompts(path)[: int(cfg.eval_num_prompts or MAX_PROMPTS)]
    wanted = int(cfg.eval_max_new_tokens or MAX_NEW_TOKENS)
    block = int(model.config.block_size)
    form = get_form(cfg.eval_form) if cfg.eval_form else None
    stop = list(form.generation_stop) if form is not None else []
    out = []
    was_training = model.training
    model.eval()
    try:
        for i, row in enumerate(rows):
            prompt_len = len(tokenizer.encode(row["prompt"])) or 1
            room = min(wanted, block - prompt_len)
            if room < 1:
                continue  # the prompt fills the context: nothing to generate
            settings = SamplingSettings(max_new_tokens=room, temperature=0.0, stop=stop)
            completion = generate(model, tokenizer, row["prompt"], settings)[0]
            ref = row.get("reference") if isinstance(row.get("reference"), str) else None
            out.append({"id": row.get("id", i), "prompt": row["prompt"], "reference": ref,
                        "completion": completion, "hypothesis": hypothesis(row["prompt"], completion, ref)})
    finally:
        model.train(was_training)
    if not out:
        return {}
    metrics = score_generations(out, form=form)
    keep = ("chrf", "form_pass_rate", "distinct_1", "distinct_2", "repeated_4gram_rate")
    return {k: float(v) for k, v in metrics.items() if k in keep}
