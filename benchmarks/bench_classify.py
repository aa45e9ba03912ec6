"""Classification inference speed: pocketlm's classifier vs transformers' LlamaForSequenceClassification
on the same weights and the same batches of the SST dev set (goal: pocketlm >= 1.2x, one run).

    python benchmarks/bench_classify.py [--model smollm2-135m|FOLDER|random] [--batch 32] [--limit N]
                                        [--rounds 3] [--dtype fp32|bf16] [--threads N] [--json OUT]

Both sides get identical right-padded batches of token ids + attention masks (the SST dev sentences in
file order, --batch rows each; pad = end-of-text) and a head with the same weights (pocketlm saves its
classifier folder, transformers loads it). Timed: every batch's forward to logits, under no_grad.
pocketlm runs `classifier_logits(..., group_overhead=32)`: the batch's rows are split into sub-batches
of similar length, so padded positions are (mostly) not computed, and its causal attention needs no
mask; transformers computes every padded position with a padding mask. Rounds alternate sides so both
see the same machine load; the ratio is of the median round times. The largest logit difference and
the prediction agreement are printed as a check that both compute the same classifier.

A third line, not part of the goal, times pocketlm's own `predict_logits` over the same rows (sorted by
length globally, as `pocketlm eval --classify` runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def shared_data() -> Path:
    here = Path(__file__).resolve().parents[1]
    for c in (os.environ.get("POCKETLM_SHARED_DATA"), here.parent / "shared" / "data", here / "shared" / "data"):
        if c and Path(c).is_dir():
            return Path(c)
    raise SystemExit("../shared/data not found: set POCKETLM_SHARED_DATA")


def load_ours(name: str):
    from pocketlm.model import GPT, get_config
    from pocketlm.tokenizer import load_tokenizer

    if name == "tiny":  # a quick check that the script runs: a 2-layer SmolLM2-shaped Llama
        from dataclasses import replace

        torch.manual_seed(0)
        cfg = replace(get_config("smollm2-135m"), n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128)
        return GPT(cfg).eval(), load_tokenizer("smollm2"), "tiny smollm2-shaped llama"
    if name != "random":
        from pocketlm.io import load_model

        model, tok = load_model(name)
        return model.eval(), tok, name
    torch.manual_seed(0)
    return GPT(get_config("smollm2-135m")).eval(), load_tokenizer("smollm2"), "random smollm2-135m shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base name, model folder, `random` (SmolLM2-135M shape) or `tiny`")
    parser.add_argument("--data", type=Path, default=None, help="SST dev file (default: shared data)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows (quick check)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--group-overhead", type=int, default=32, help="pocketlm's sub-batch cost in tokens")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification

    from pocketlm.classify.data import encode_rows, read_labelled
    from pocketlm.classify.io import ClassifierInfo, save_classifier
    from pocketlm.classify.model import attach_head, classifier_logits, pad_batch
    from pocketlm.classify.predict import predict_logits

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ours, tok, label = load_ours(args.model)
    attach_head(ours, 5, seed=0)
    pad = tok.eos_id if tok.eos_id is not None else 0
    info = ClassifierInfo(labels=[0, 1, 2, 3, 4], text_column="sentence", label_column="sentiment", pad_id=pad)
    with tempfile.TemporaryDirectory() as tmp:  # the same weights, read by transformers
        folder = save_classifier(ours, tok, Path(tmp) / "clf", info)
        theirs = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    ours.to(dtype=dtype)
    theirs.to(dtype=dtype)

    path = args.data or shared_data() / "sst" / "ids-sst-dev.csv"
    rows = read_labelled(path, "sentence", "sentiment").rows[: args.limit]
    ids = encode_rows(tok, rows, 512).ids
    batches = [pad_batch(ids[s:s + args.batch], pad) for s in range(0, len(ids), args.batch)]
    real = sum(map(len, ids))
    padded = sum(x.numel() for x, _ in batches)
    print(f"{label}, {args.dtype}, {torch.get_num_threads()} threads: {len(ids)} SST dev rows, {len(batches)} "
          f"batches of {args.batch}, {real:,} tokens ({padded:,} with padding)")

    def run_ours():
        return torch.cat([classifier_logits(ours, x, m, group_overhead=args.group_overhead) for x, m in batches])

    def run_theirs():
        return torch.cat([theirs(input_ids=x, attention_mask=m).logits for x, m in batches])

    def run_sorted():
        return predict_logits(ours, ids, pad_id=pad, batch_size=args.batch)

    sides = {"pocketlm": run_ours, "transformers": run_theirs, "pocketlm-sorted": run_sorted}
    times: dict[str, list[float]] = {k: [] for k in sides}
    outputs = {}
    with torch.no_grad():
        for name, fn in sides.items():  # warm-up (and the outputs compared below)
            outputs[name] = fn().float()
        for _ in range(args.rounds):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = (outputs["pocketlm"] - outputs["transformers"]).abs().max().item()
    agree = (outputs["pocketlm"].argmax(-1) == outputs["transformers"].argmax(-1)).float().mean().item()
    print(f"{'side':<16}{'median s':>10}{'best s':>10}{'rows/s':>10}{'tokens/s':>11}")
    for name in sides:
        print(f"{name:<16}{med[name]:>10.3f}{min(times[name]):>10.3f}{len(ids) / med[name]:>10.1f}"
              f"{real / med[name]:>11.0f}")
    ratio = med["transformers"] / med["pocketlm"]
    print(f"speed-up on the same batches (transformers / pocketlm, medians): {ratio:.2f}x (goal >= 1.2x)")
    print(f"pocketlm sorted by length vs transformers: {med['transformers'] / med['pocketlm-sorted']:.2f}x "
          "(not the goal: different batches)")
    print(f"max |logit difference| {diff:.2e}; same prediction on {agree:.1%} of rows")
    if args.json:
        args.json.write_text(json.dumps({"model": label, "dtype": args.dtype, "rows": len(ids), "batch": args.batch,
                                         "times": times, "median_s": med, "ratio": ratio, "max_logit_diff": diff,
                                         "prediction_agreement": agree, "threads": torch.get_num_threads()},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
