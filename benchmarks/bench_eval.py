"""Evaluation throughput (forward only): pocketlm's scorer vs transformers, on the same weights.

    python benchmarks/bench_eval.py [--model smollm2-135m|FOLDER|random] [--context 512] [--stride N]
                                    [--batch 4] [--batches 3] [--repeats 3] [--device cpu|cuda]
                                    [--dtype fp32|bf16]

Scores one stream of random token ids in windows of --context tokens that advance by --stride (default:
the context, disjoint windows; `pocketlm eval` defaults to half the context), --batch windows per
forward pass: pocketlm with `pocketlm.eval.likelihood.score_tokens` (what `pocketlm eval` runs),
transformers with LlamaForCausalLM / GPT2LMHeadModel on the same windows, each window's context-only
targets set to -100, and the per-token cross-entropy as transformers computes its own loss (fp32
logits, flattened). Runs alternate so both see the same machine load. Prints tokens/s (median and
best), the ratio, and the largest difference of the per-token losses.

--model random (the default when smollm2-135m cannot be loaded) builds a randomly initialised
SmolLM2-135M-shaped Llama (seeded): the speed is the same as with the real weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load_ours(name: str):
    from pocketlm.model import GPT, get_config

    if name != "random":
        from pocketlm.io import load_model

        try:
            model, _ = load_model(name)
            return model.eval(), name
        except Exception as exc:  # noqa: BLE001 - fall back to the same shape, random weights
            if name != "smollm2-135m":
                raise
            print(f"could not load {name} ({exc}); using random SmolLM2-135M-shaped weights")
    torch.manual_seed(0)
    return GPT(get_config("smollm2-135m")).eval(), "random smollm2-135m shape"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="base name, model folder, or `random`")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="window advance (default: the context)")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--batches", type=int, default=3, help="forward passes per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from pocketlm.eval.likelihood import score_tokens, sliding_windows
    from pocketlm.io import save_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ours, label = load_ours(args.model)
    with tempfile.TemporaryDirectory() as tmp:  # the same weights, read by transformers
        folder = save_model(ours, None, Path(tmp) / "model")
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours.to(device=device, dtype=dtype)
    theirs.to(device=device, dtype=dtype)

    L, B = args.context, args.batch
    stride = args.stride or L
    n_tokens = L + stride * (B * args.batches - 1)  # targets in B * batches windows
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, ours.config.vocab_size, (n_tokens + 1,), generator=g)
    windows = sliding_windows(n_tokens, L, stride)
    results: dict[str, torch.Tensor] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_ours() -> None:
        # prefix=None: the stream's first token is context only, so n_tokens targets in n_tokens / L windows
        nll, _ = score_tokens(ours, stream, context=L, stride=stride, batch_size=B, precision="fp32")
        results["pocketlm"] = nll
        sync()

    def run_theirs() -> None:
        nll = torch.empty(n_tokens, dtype=torch.float64)
        with torch.inference_mode():
            for first in range(0, len(windows), B):
                group = windows[first:first + B]
                x = torch.stack([stream[b:e] for b, e, _ in group]).to(device)
                y = torch.stack([stream[b + 1:e + 1] for b, e, _ in group])
                for row, (b, e, n) in enumerate(group):
                    y[row, : e - b - n] = -100
                logits = theirs(input_ids=x).logits
                losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten().to(device), reduction="none")
                losses = losses.view(y.shape).double().cpu()
                for row, (_, e, n) in enumerate(group):
                    nll[e - n:e] = losses[row, -n:]
        results["transformers"] = nll
        sync()

    times: dict[str, list[float]] = {"pocketlm": [], "transformers": []}
    run_ours(), run_theirs()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("pocketlm", run_ours), ("transformers", run_theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    diff = (results["pocketlm"] - results["transformers"]).abs().max().item()
    print(f"model: {label}, {ours.num_parameters() / 1e6:.1f}M parameters; device {device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads; context {L}, stride {stride}, batch {B}, {n_tokens} tokens per run")
    print(f"{'':14}{'median tok/s':>14}{'best tok/s':>14}")
    rate = {}
    for name, ts in times.items():
        rate[name] = n_tokens / statistics.median(ts)
        print(f"{name:14}{rate[name]:>14,.0f}{n_tokens / min(ts):>14,.0f}")
    print(f"ratio pocketlm / transformers (median): {rate['pocketlm'] / rate['transformers']:.3f}")
    print(f"max |per-token loss difference|: {diff:.2e} nats")


if __name__ == "__main__":
    main()
