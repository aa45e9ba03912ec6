"""Decoding speed at batch 1: pocketlm's KV-cache loop vs transformers' generate, on the same weights.

    python benchmarks/bench_decode.py [--model gpt2] [--new-tokens 128] [--repeats 3] [--threads N]

Builds a randomly initialised named config (seeded), saves it as a pocketlm model folder, loads that
folder with transformers' AutoModelForCausalLM, and times greedy decoding of --new-tokens tokens with
each, alternating runs so both see the same machine load. Prints tokens/s (median and best of the
repeats, prefill of the short prompt included), CPU milliseconds per token (steadier than wall time on
a busy machine; with several threads it includes their spin-waiting), the ratio, whether both produced the same tokens, and
the memory-bandwidth bound: every decoded token reads every weight once, so tokens/s <= bandwidth /
weight bytes (default 17 GB/s, a typical laptop's DRAM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "The history of the old city begins with a small harbour on the northern coast, where"


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a loaded machine CPU time shows the work itself."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measured_bandwidth_gbs(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """This machine's read bandwidth: the best of a few sums over a buffer far larger than any cache."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    best = min(timed(x.sum)[0] for _ in range(repeats))
    return n_bytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="a named config from `pocketlm models` (gpt2)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--bandwidth-gbs", type=float, default=17.0,
                        help="nominal memory bandwidth for the bound (the measured one is printed beside it)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, GenerationConfig

    from pocketlm.checkpoint import save_model
    from pocketlm.generate import SamplingSettings, generate_tokens
    from pocketlm.model import GPT, get_config
    from pocketlm.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = get_config(args.model)
    ours = GPT(cfg).eval()
    tokenizer = load_tokenizer(cfg.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(ours, tokenizer, Path(tmp) / args.model)
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours.to(device)
    theirs.to(device)

    idx = torch.tensor([tokenizer.encode(PROMPT)], device=device)
    n = args.new_tokens
    settings = SamplingSettings(max_new_tokens=n, temperature=0)
    # No end-of-text and no minimum length: both decode exactly n tokens with unmodified logits.
    gen_config = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None,
                                  pad_token_id=tokenizer.eos_id, bos_token_id=None)
    results: dict[str, torch.Tensor] = {}

    def run_ours() -> None:
        results["pocketlm"] = generate_tokens(ours, idx, settings, eos_id=None)[0]
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_theirs() -> None:
        with torch.inference_mode():
            out = theirs.generate(idx, generation_config=gen_config, attention_mask=torch.ones_like(idx))
        results["transformers"] = out[0, idx.size(1):]
        if device.type == "cuda":
            torch.cuda.synchronize()

    run_ours()  # warm-up: first-call allocations, kernel selection
    run_theirs()
    times: dict[str, list[float]] = {"pocketlm": [], "transformers": []}
    cpu_times: dict[str, list[float]] = {"pocketlm": [], "transformers": []}
    for _ in range(args.repeats):  # alternate so that both see the same background load
        for name, fn in (("pocketlm", run_ours), ("transformers", run_theirs)):
            wall, cpu = timed(fn)
            times[name].append(wall)
            cpu_times[name].append(cpu)

    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied weights once
    bound = args.bandwidth_gbs * 1e9 / weight_bytes
    measured = measured_bandwidth_gbs() if device.type == "cpu" else float("nan")
    measured_bound = measured * 1e9 / weight_bytes
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    best = {k: n / min(v) for k, v in times.items()}
    same = torch.equal(results["pocketlm"].cpu(), results["transformers"].cpu())
    if not same:
        diff = (results["pocketlm"].cpu() != results["transformers"].cpu()).nonzero()
        first_diff = int(diff[0]) if diff.numel() else min(len(results["pocketlm"]), len(results["transformers"]))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"decode benchmark: {args.model} ({ours.num_parameters():,} parameters, random weights, fp32), "
          f"batch 1, prompt {idx.size(1)} tokens, {n} new tokens, greedy, KV cache")
    print(f"device {device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {load:.2f}, repeats {args.repeats}")
    print()
    print(f"{'implementation':<16}{'tokens/s (median)':>19}{'tokens/s (best)':>17}{'% of bound':>12}"
          f"{'% of measured':>15}{'CPU ms/token':>14}")
    for k in ("pocketlm", "transformers"):
        cpu_ms = 1000 * statistics.median(cpu_times[k]) / n
        print(f"{k:<16}{rate[k]:>19.1f}{best[k]:>17.1f}{100 * rate[k] / bound:>11.0f}%"
              f"{100 * rate[k] / measured_bound:>14.0f}%{cpu_ms:>14.1f}")
    print()
    print(f"ratio pocketlm / transformers (median): {rate['pocketlm'] / rate['transformers']:.2f}x")
    print(f"memory-bandwidth bound: {weight_bytes / 1e6:.1f} MB of weights per token / {args.bandwidth_gbs:g} GB/s "
          f"= {bound:.1f} tokens/s; at this machine's measured {measured:.1f} GB/s: {measured_bound:.1f} tokens/s")
    print("same greedy tokens: " + ("yes" if same else f"NO (first difference at new token {first_diff})"))


if __name__ == "__main__":
    main()
