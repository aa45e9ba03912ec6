"""The main job: from scratch vs fine-tuned on the built-in Shakespeare corpus, side by side.

Every stage writes into one folder (default runs/demo) and is skipped when its result is already there,
so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from pocketlm.data.batches import Batches, TokenSplit
from pocketlm.errors import UserError
from pocketlm.recipe import load_recipe


def _say(text: str) -> None:
    print(text, flush=True)


def prepare_corpus(out: Path, tokenizer: str) -> Path:
    from pocketlm.data.prepare import prepare

    if not (out / "manifest.json").exists():
        _say(f"• preparing the built-in Shakespeare corpus with the {tokenizer} tokenizer → {out}")
        prepare("shakespeare", out, tokenizer=tokenizer, val_fraction=0.1, seed=1337)
    return out


def pretrain_from_scratch(data: Path, out: Path, device: str, max_steps: int | None) -> dict:
    from pocketlm.cli.pretrain import build_model
    from pocketlm.train import train

    cfg = load_recipe("shakespeare-scratch", {"data": str(data), "out": str(out), "device": device,
                                              "max_steps": max_steps, "resume": True})
    summary_path = out / "summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text()).get("steps") == cfg.max_steps:
        return json.loads(summary_path.read_text())
    model, tokenizer = build_model(cfg.model, cfg.data, cfg.seed)
    _say(f"• pretraining {cfg.model} ({model.num_parameters():,} parameters) from scratch for "
         f"{cfg.max_steps} steps of {cfg.batch_tokens:,} tokens")
    return train(model, tokenizer, cfg)


@torch.no_grad()
def validation_figures(model, data: Path, context: int, max_windows: int = 64) -> dict:
    """Validation loss and bits per byte over the same windows for any tokenizer."""
    split = TokenSplit(data, "val")
    context = min(context, split.tokens - 1)
    batches = Batches(split, context, seed=0, shuffle=False)
    windows = min(batches.n, max_windows)
    total, count = 0.0, 0
    model.eval()
    for start in range(0, windows, 8):
        x, y = batches.get(start, min(8, windows - start))
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    loss = total / count
    figures = {"val_loss": loss, "perplexity": math.exp(loss)}
    if split.bytes:
        bytes_per_token = split.bytes / split.tokens
        figures["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return figures


def run_demo(out: str | Path = "runs/demo", device: str = "cpu", scratch_steps: int | None = None,
             sample_tokens: int = 80) -> dict:
    from pocketlm.checkpoint import load_model
    from pocketlm.generate import SamplingSettings, generate

    out = Path(out)
    t0 = time.perf_counter()
    data = prepare_corpus(out / "data-gpt2", "gpt2")
    summary = pretrain_from_scratch(data, out / "scratch", device, scratch_steps)
    rows = []
    model, tokenizer = load_model(out / "scratch", device="cpu")
    metrics = [json.loads(line) for line in (out / "scratch" / "metrics.jsonl").read_text().splitlines()]
    val_curve = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    figures = validation_figures(model, data, context=128)
    rows.append({"model": "from scratch (gpt2-mini)", **figures, "steps": summary["steps"],
                 "trainable": summary["trainable_parameters"], "tokens_per_s": summary["tokens_per_s"]})
    prompt = "ROMEO:\n"
    settings = SamplingSettings(max_new_tokens=sample_tokens, temperature=0.8, top_p=0.9, seed=1)
    sample = generate(model, tokenizer, prompt, settings)[0]

    _say("\n== validation loss during training (from scratch) ==")
    for step, loss in val_curve:
        _say(f"  step {step:>5}  val_loss {loss:.3f}")
    _say("\n== results ==")
    _say(f"  {'model':<28} {'val loss':>9} {'ppl':>9} {'bits/byte':>10} {'steps':>6} {'tok/s':>8}")
    for r in rows:
        _say(f"  {r['model']:<28} {r['val_loss']:>9.3f} {r['perplexity']:>9.1f} "
             f"{r.get('bits_per_byte', float('nan')):>10.3f} {r['steps']:>6} {r['tokens_per_s']:>8,.0f}")
    _say(f"\n== sample (from scratch, prompt {prompt!r}, temperature 0.8, top-p 0.9) ==\n{prompt}{sample}\n")
    if len(val_curve) >= 2 and not val_curve[-1][1] < val_curve[0][1]:
        raise UserError("validation loss did not fall during the demo run: something is wrong with training")
    result = {"rows": rows, "val_curve": val_curve, "sample": sample, "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    _say(f"done in {result['wall_s'] / 60:.1f} min; results in {out / 'demo.json'}")
    return result


if __name__ == "__main__":  # pragma: no cover
    run_demo(*sys.argv[1:2])
