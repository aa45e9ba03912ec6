"""Measuring a trained cell (the `measures:` of its study) on its best checkpoint.

Each measure's numbers are saved in DIR/CELL/measures.json as soon as they exist, so a cell interrupted
while measuring does not measure again what it already has. Generations and samples are kept beside it
(study_generations.jsonl, study_samples.jsonl) for the report.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from pocketlm.atomic import atomic_write_json
from pocketlm.device import model_device
from pocketlm.errors import UserError

MEASURES_FILE = "measures.json"
SAMPLES_FILE = "study_samples.jsonl"
GENERATIONS_FILE = "study_generations.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from pocketlm.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _settings(sampling: dict, options: dict | None = None, **defaults):
    from pocketlm.generate import SamplingSettings

    merged = {**defaults, **{k: v for k, v in sampling.items() if k in ("max_new_tokens", "temperature", "top_k",
                                                                         "top_p", "repetition_penalty", "stop",
                                                                         "seed")}}
    merged.update({k: v for k, v in (options or {}).items() if k in ("max_new_tokens", "temperature", "top_k",
                                                                     "top_p", "repetition_penalty", "seed")})
    merged["stop"] = list(merged.get("stop") or [])
    return SamplingSettings(**merged)


def measure_cell(payload: dict, cell: dict, source: Path, data_dir: Path) -> dict:
    """The cell's measures on the model at `source` (its run directory, or its quantized folder)."""
    from pocketlm.io import load_model
    from pocketlm.study.knobs import resolve_base

    measures: dict = payload["measures"]
    run = Path(payload["study_dir"]) / cell["id"]
    cache_path = run / MEASURES_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    model, tokenizer = load_model(source, device=_device(cell))
    model.eval()
    base = resolve_base(cell["knobs"], run.parent) if cell["knobs"]["method"] != "pretrain" else None
    if base is not None and str(Path(base)) == str(source):
        base = None  # the untouched base: nothing to compare with
    want = list(measures)
    if payload["sampling"] or "form_pass_rate" in measures:
        want.append("samples")
    for name in want:
        if name in cache:
            continue
        if name == "bits_per_byte" and "val_loss" in cache:
            cache[name] = {}
            continue
        with torch.no_grad():
            cache[name] = _MEASURE_FUNCS[name](model, tokenizer, measures.get(name, {}), payload, run,
                                               data_dir, base)
        atomic_write_json(cache_path, cache)
    out: dict = {}
    for name in want:
        out.update(cache[name])
    return out


def _device(cell: dict) -> str:
    from pocketlm.device import pick_device

    return str(pick_device(cell["knobs"].get("device", "auto")))


def _likelihood(model, tokenizer, options, payload, run, data_dir, base) -> dict:
    from pocketlm.eval.likelihood import evaluate_split

    context = min(int(options.get("context") or model.config.block_size), model.config.block_size)
    r = evaluate_split(model, tokenizer, data_dir, "val", context=context,
                       max_tokens=int(options.get("max_tokens") or 16384))
    return {"val_loss": r.loss, "perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte,
            "val_tokens": r.tokens}


def _fits(model, tokenizer, prompt: str, wanted: int) -> int:
    return max(0, min(wanted, model.config.block_size - len(tokenizer.encode(prompt)) - 1))


def _chrf(model, tokenizer, options, payload, run, data_dir, base) -> dict:
    from pocketlm.eval.generation_eval import evaluate_generation, read_prompt_pairs, sonnet_prompt_pairs

    rows = sonnet_prompt_pairs(*options["sonnet"]) if options.get("sonnet") else read_prompt_pairs(options["prompts"])
    rows = rows[: int(options.get("limit") or len(rows))]
    settings = _settings(payload["sampling"], options, max_new_tokens=128, temperature=0.0, seed=1337)
    wanted = settings.max_new_tokens
    kept = [r for r in rows if _fits(model, tokenizer, r["prompt"], wanted) >= 1]
    if not kept:
        raise UserError("every chrF prompt is longer than the model's context")
    settings.max_new_tokens = min(_fits(model, tokenizer, r["prompt"], wanted) for r in kept)
    metrics, generations = evaluate_generation(model, tokenizer, kept, settings, form=options.get("form"))
    _write_jsonl(run / GENERATIONS_FILE, generations)
    out = {"chrf": metrics["chrf"], "chrf_prompts": len(kept)}
    if "form_pass_rate" in metrics:
        out["chrf_form_pass_rate"] = metrics["form_pass_rate"]
    return out


def _samples(model, tokenizer, options, payload, run, data_dir, base) -> dict:
    """Samples with the study's sampling settings; the form check (form_pass_rate) runs on them."""
    from pocketlm.eval.forms import get_form
    from pocketlm.generate import generate

    sampling = payload["sampling"]
    prompts = sampling.get("prompts") or [""]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = int(sampling.get("n", 2))
    settings = _settings(sampling, None, max_new_tokens=96, temperature=0.8, top_p=0.95, seed=1337)
    rows = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        settings.max_new_tokens = _fits(model, tokenizer, prompt, settings.max_new_tokens) or 1
        settings.seed = int(sampling.get("seed", 1337)) + i
        rows.append({"prompt": prompt, "text": generate(model, tokenizer, prompt, settings)[0]})
    out: dict = {"samples": len(rows)}
    form_options = payload["measures"].get("form_pass_rate")
    if form_options is not None:
        form = get_form(form_options["form"])
        for r in rows:
            result = form.validate(form.first_sample(r["prompt"] + r["text"]))
            r["form"] = result.to_dict()
        out["form_pass_rate"] = sum(r["form"]["passed"] for r in rows) / len(rows)
    _write_jsonl(run / SAMPLES_FILE, rows)
    return out


def _hellaswag(model, tokenizer, options, payload, run, data_dir, base) -> dict:
    from pocketlm.eval.multiple_choice import evaluate_multiple_choice, read_multiple_choice

    items = read_multiple_choice(options["path"], int(options.get("limit", 100)))
    r = evaluate_multiple_choice(model, tokenizer, items, context=model.config.block_size)
    return {"hellaswag_acc": r["acc"], "hellaswag_acc_norm": r["acc_norm"], "hellaswag_items": r["items"]}


def _general_text(options: dict) -> str:
    """The forgetting probe's text: a text file, or (HellaSwag JSONL, the default) the first 300 items'
    contexts with their correct endings: everyday English that no study corpus is about."""
    path = Path(options["text"])
    if path.suffix == ".jsonl":
        from pocketlm.eval.multiple_choice import read_multiple_choice

        return "\n".join(f"{i.context} {i.endings[i.label]}" for i in read_multiple_choice(path, 300))
    return path.read_text(encoding="utf-8")


def _probe(model, tokenizer, text: str, max_tokens: int) -> float:
    from pocketlm.eval.likelihood import evaluate_text

    return evaluate_text(model, tokenizer, text, max_tokens=max_tokens,
                         context=min(256, model.config.block_size)).bits_per_byte


def _forgetting(model, tokenizer, options, payload, run, data_dir, base) -> dict:
    """Bits per byte on general text, after minus before (positive: the cell forgot). Before is where the
    cell's chain started (grid.forgetting_reference), not its immediate base: the same for every cell."""
    from pocketlm.io import load_model
    from pocketlm.study.knobs import resolve_base

    reference = payload["cell"].get("reference", base)
    base = resolve_base({"base": reference}, run.parent) if reference and base is not None else None
    if base is None:
        return {"forgetting_bpb": None}
    text = _general_text(options)
    max_tokens = int(options.get("max_tokens") or 4096)
    key = hashlib.sha256(f"{base}\n{max_tokens}\n{text}".encode()).hexdigest()[:16]
    cached = run.parent / "_data" / "probes" / f"{key}.json"
    if cached.exists():
        before = json.loads(cached.read_text())["bits_per_byte"]
    else:
        base_model, base_tok = load_model(base, device=model_device(model))
        before = _probe(base_model.eval(), base_tok, text, max_tokens)
        del base_model
        atomic_write_json(cached, {"base": base, "bits_per_byte": before})
    after = _probe(model, tokenizer, text, max_tokens)
    return {"forgetting_bpb": after - before, "general_bpb": after, "general_bpb_base": before}


def _kl(model, tokenizer, options, payload, run, data_dir, base) -> dict:
    """Mean KL(base || cell) per token over the first validation tokens: how far the cell moved."""
    from pocketlm.eval.likelihood import load_split_tokens
    from pocketlm.io import load_model

    if base is None:
        return {"kl_from_base": None}
    device = model_device(model)
    base_model, _ = load_model(base, device=device)
    base_model.eval()
    tokens, _ = load_split_tokens(data_dir, "val", int(options.get("max_tokens") or 4096))
    context = min(256, model.config.block_size, base_model.config.block_size)
    total, count = 0.0, 0
    for start in range(0, max(1, len(tokens) - 1), context):
        x = torch.as_tensor(tokens[start:start + context], device=device).unsqueeze(0)
        p_log = torch.log_softmax(base_model(x)[0].float(), -1)
        q_log = torch.log_softmax(model(x)[0].float(), -1)
        total += (p_log.exp() * (p_log - q_log)).sum().item()
        count += x.shape[1]
    del base_model
    return {"kl_from_base": total / max(1, count)}


def _decode_speed(model, tokenizer, options, payload, run, data_dir, base) -> dict:
    from pocketlm.generate import SamplingSettings, run_generation

    wanted = _fits(model, tokenizer, "\n", int(options.get("tokens") or 64))
    g = run_generation(model, tokenizer, "\n", SamplingSettings(max_new_tokens=max(1, wanted), temperature=0.0))
    decode_s = g.seconds - g.first_token_seconds  # after the prompt's prefill and the first token
    tokens = sum(g.new_tokens)
    rate = (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else tokens / max(g.seconds, 1e-9)
    return {"decode_tokens_per_s": rate if math.isfinite(rate) else None}


def _zero_shot(model, tokenizer, options, payload, run, data_dir, base) -> dict:
    """Seed 001's generality check: a generative model asked to classify (sentiment or paraphrase)."""
    from pocketlm.classify.data import read_labelled
    from pocketlm.eval.zero_shot import evaluate_zero_shot, get_probe

    probe = get_probe(options["probe"])
    data = read_labelled(options["path"], probe.text_column, probe.label_column, probe.text_pair_column)
    rows = data.rows[: int(options.get("limit") or 200)]
    r = evaluate_zero_shot(model, tokenizer, rows, probe, context=model.config.block_size)
    return {"zero_shot_acc": r["accuracy"], "zero_shot_acc_calibrated": r["accuracy_calibrated"],
            "zero_shot_majority": r["majority_accuracy"], "zero_shot_examples": r["examples"]}


_MEASURE_FUNCS = {"zero_shot": _zero_shot, "val_loss": _likelihood, "bits_per_byte": _likelihood, "chrf": _chrf, "samples": _samples,
                  "form_pass_rate": lambda *a: {}, "hellaswag": _hellaswag, "forgetting": _forgetting,
                  "kl": _kl, "decode_speed": _decode_speed}
