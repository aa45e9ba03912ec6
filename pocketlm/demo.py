"""The main job: from scratch vs fine-tuned (full and LoRA) on the built-in Shakespeare corpus, side by side.

Every stage writes into one folder (default runs/demo) and is skipped when its result is already there,
so an interrupted demo picks up where it stopped. Each training stage runs as its own `pocketlm`
process: the same commands a user types, and a peak-memory figure that belongs to that stage alone.
The models use different tokenizers, so they are compared on the same held-out text in bits per byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.rundir import RunDir

SCRATCH_MODEL = "gpt2-mini"
BASE = "smollm2-135m"
PROMPT = "ROMEO:\n"
EVAL_TOKENS = 4096  # GPT-2 tokens of held-out text that every model is scored on


def _say(text: str = "") -> None:
    print(text, flush=True)


def _prepare(out: Path, tokenizer: str) -> Path:
    from pocketlm.data.prepare import prepare

    if not (out / "manifest.json").exists():
        _say(f"• preparing the built-in Shakespeare corpus with the {tokenizer} tokenizer → {out}")
        prepare("shakespeare", out, tokenizer=tokenizer, val_fraction=0.1, seed=1337)
    return out


def _finished(run: Path) -> dict | None:
    """The run's summary when it finished (all its steps, or stopped early), else None."""
    rundir = RunDir(run)
    summary = rundir.read_summary()
    if summary is None:
        return None
    wanted = rundir.read_config().get("max_steps")
    return summary if summary["stopped_early"] or summary["steps"] == wanted else None


def _train_stage(title: str, run: Path, args: list[str]) -> dict:
    """Run one `pocketlm pretrain|finetune` in a child process (resuming if it was interrupted)."""
    summary = _finished(run)
    if summary is not None:
        _say(f"• {title}: already done ({run})")
        return summary
    _say(f"• {title}")
    command = [sys.executable, "-m", "pocketlm", *args, "--out", str(run), "--resume"]
    _say("  $ " + " ".join(["pocketlm", *command[3:]]))
    result = subprocess.run(command, env=os.environ.copy())
    if result.returncode != 0:
        raise UserError(f"stage '{title}' failed (exit {result.returncode}); fix the error above and re-run "
                        "`pocketlm demo` to continue from there")
    return RunDir(run).read_summary() or {}


def _size_on_disk(run: Path) -> int:
    step = RunDir(run).best_or_latest()
    files = [p for p in step.rglob("*") if p.is_file() and p.suffix in (".safetensors",)]
    return sum(p.stat().st_size for p in files)


def _heldout_text(gpt2_data: Path) -> str:
    """The first EVAL_TOKENS tokens of the validation split, as text: one text for every model."""
    from pocketlm.eval.likelihood import load_split_tokens
    from pocketlm.tokenizer import load_tokenizer

    tokens, _ = load_split_tokens(gpt2_data, "val", max_tokens=EVAL_TOKENS)
    tokenizer = load_tokenizer(gpt2_data)
    return tokenizer.decode([t for t in tokens.tolist() if t != tokenizer.eos_id])


def _evaluate(source, text: str, device: str) -> tuple[dict, str]:
    """Loss, perplexity and bits per byte on `text`, and one sample, through pocketlm.eval and generate."""
    from pocketlm.eval.likelihood import evaluate_text
    from pocketlm.generate import SamplingSettings, generate
    from pocketlm.io import load_model

    model, tokenizer = load_model(source, device=device if device != "auto" else "cpu")
    figures = evaluate_text(model, tokenizer, text, context=256).to_dict()
    settings = SamplingSettings(max_new_tokens=60, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=1)
    sample = generate(model, tokenizer, PROMPT, settings)[0]
    return figures, sample


def run_demo(out: str | Path = "runs/demo", device: str = "auto", scratch_steps: int | None = None,
             finetune_steps: int | None = None, skip_finetune: bool = False) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    gpt2_data = _prepare(out / "data-gpt2", "gpt2")
    common = ["--device", device]
    rows: list[dict] = []
    stages = [("from scratch", SCRATCH_MODEL, out / "scratch",
               ["pretrain", "--config", "shakespeare-scratch", "--data", str(gpt2_data), *common,
                *(["--max-steps", str(scratch_steps)] if scratch_steps else [])])]
    if not skip_finetune:
        base_data = _prepare(out / "data-smollm2", BASE)
        steps = ["--max-steps", str(finetune_steps)] if finetune_steps else []
        stages += [
            ("full fine-tune", BASE, out / "full",
             ["finetune", "--config", "shakespeare-full", "--data", str(base_data), *common, *steps]),
            ("LoRA r8 attn+mlp", BASE, out / "lora",
             ["finetune", "--config", "shakespeare-lora", "--data", str(base_data), *common, *steps]),
        ]
    summaries = {title: _train_stage(f"{title} ({model})", run, args) for title, model, run, args in stages}

    _say("• evaluating every model on the same held-out text")
    text = _heldout_text(gpt2_data)
    samples = {}
    if not skip_finetune:
        figures, samples[f"{BASE} before fine-tuning"] = _evaluate(BASE, text, device)
        rows.append({"model": f"{BASE} (no fine-tuning)", **figures, "trainable": 0})
    for title, model_name, run, _ in stages:
        figures, samples[title] = _evaluate(run, text, device)
        s = summaries[title]
        rows.append({"model": f"{title} ({model_name})", **figures, "trainable": s["trainable_parameters"],
                     "parameters": s["parameters"], "steps": s["steps"], "tokens_per_s": s["tokens_per_s"],
                     "peak_memory_bytes": s["peak_memory_bytes"], "disk_bytes": _size_on_disk(run),
                     "train_val_curve": _val_curve(run)})

    _print_results(rows, samples, len(text.encode()))
    result = {"rows": rows, "samples": samples, "eval_text_bytes": len(text.encode()),
              "wall_s": round(time.perf_counter() - t0, 1)}
    from pocketlm.atomic import atomic_write_json

    atomic_write_json(out / "demo.json", result)
    scratch_curve = rows[-len(stages)]["train_val_curve"] if stages else []
    if len(scratch_curve) >= 2 and not scratch_curve[-1][1] < scratch_curve[0][1]:
        raise UserError("validation loss did not fall during the from-scratch run: training is broken")
    _say(f"\ndone in {result['wall_s'] / 60:.1f} min; results in {out / 'demo.json'}")
    return result


def _val_curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in RunDir(run).read_metrics() if "val_loss" in r]


def _mb(n: int | None) -> str:
    return f"{n / 2**20:,.0f}" if n else "-"


def _print_results(rows: list[dict], samples: dict, n_bytes: int) -> None:
    _say("\n== validation loss during training ==")
    for r in rows:
        if r.get("train_val_curve"):
            curve = "  ".join(f"{step}:{loss:.3f}" for step, loss in r["train_val_curve"])
            _say(f"  {r['model']:<34} {curve}")
    _say(f"\n== held-out Shakespeare ({n_bytes:,} bytes, the same text for every model) ==")
    _say("  loss and perplexity are per token of each model's own tokenizer (GPT-2 vs SmolLM2): compare models")
    _say("  with different tokenizers by bits per byte, which does not depend on the tokenizer.")
    header = (f"  {'model':<34} {'bits/byte':>9} {'loss':>7} {'ppl':>8} {'trainable':>12} {'tok/s':>7} "
              f"{'peak MB':>8} {'disk MB':>8}")
    _say(header)
    for r in rows:
        _say(f"  {r['model']:<34} {r['bits_per_byte']:>9.3f} {r['loss']:>7.3f} {r['perplexity']:>8.1f} "
             f"{r['trainable']:>12,} {r.get('tokens_per_s') or 0:>7,.0f} {_mb(r.get('peak_memory_bytes')):>8} "
             f"{_mb(r.get('disk_bytes')):>8}")
    for title, sample in samples.items():
        _say(f"\n== sample: {title} (prompt {PROMPT!r}, temperature 0.8, top-p 0.9) ==\n{PROMPT}{sample}")
