"""This machine's matrix-multiply ceiling, measured in the same run as the benchmark that divides by it.

Machines differ (one measured bf16 GEMM at ~395 GFLOP/s, another at ~790, with the same fp32 figure), so a
tokens/s figure means little alone: the training benchmarks report each variant as a share of the GEMM
rate this CPU (or GPU) reaches on its own, in the same process settings (threads, allocator).

    python benchmarks/ceiling.py                  # fp32 and bf16 GFLOP/s on the shapes below
    python benchmarks/ceiling.py --threads 1

The ceiling is the best rate over a square GEMM and the shapes a smollm2-135m / gpt2 training step runs
(batch 8 x 256 = 2048 rows), each timed as the median of several calls after a warm-up.

FLOPs of a step (`step_flops_per_token`) count the linear layers only (attention scores, norms and the
LoRA matrices are left out, so the share is a slight underestimate): 2 FLOPs per weight and token forward,
2 more for the input gradient, and 2 more for the weight gradient where the weight trains. A LoRA step on
a frozen base is 4 x (linear weights), a full step 6 x; smollm2-135m's LoRA step is ~0.54 GFLOP a token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ((2048, 2048, 2048), (2048, 576, 1536), (2048, 1536, 576), (2048, 768, 3072), (2048, 3072, 768))


def gemm_gflops(m: int, k: int, n: int, dtype, device: str = "cpu", repeats: int = 5) -> float:
    """GFLOP/s of (m x k) @ (k x n) in `dtype`: the median of `repeats` timed calls after one warm-up."""
    import torch

    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def gemm_ceiling(precision: str, device: str = "cpu", shapes=SHAPES) -> dict:
    """{"gflops": the best rate, "by_shape": {"MxKxN": rate}} for precision fp32 or bf16."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    by_shape = {f"{m}x{k}x{n}": gemm_gflops(m, k, n, dtype, device) for m, k, n in shapes}
    return {"gflops": max(by_shape.values()), "by_shape": by_shape}


def measured_ceilings(precisions, *, threads: int | None = None, device: str = "cpu",
                      preload: str | None = None) -> dict[str, float]:
    """{precision: GFLOP/s} measured in a fresh subprocess set up as a benchmark's workers are (threads,
    LD_PRELOAD allocator), so the ceiling and the figures divided by it share the process settings."""
    code = ("import json, torch, ceiling; " + (f"torch.set_num_threads({threads}); " if threads else "")
            + f"print(json.dumps({{p: ceiling.gemm_ceiling(p, {device!r})['gflops'] for p in {list(precisions)!r}}}))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent))
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = preload
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    ceilings = json.loads(proc.stdout.strip().splitlines()[-1])
    print("GEMM ceiling: " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in ceilings.items()), flush=True)
    return ceilings


def linear_weights(model) -> int:
    """Weights of every nn.Linear-like layer a token passes through (blocks and the output head; a tied
    head counted once as a matmul, since the forward runs it)."""
    import torch.nn as nn

    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
    return total


def step_flops_per_token(weights: int, *, frozen_base: bool) -> int:
    """Linear-layer FLOPs of one training step per token, for `weights` linear weights (linear_weights):
    4 x when the base is frozen (LoRA: forward + input gradient), 6 x when every weight trains."""
    return (4 if frozen_base else 6) * weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for precision in ("fp32", "bf16"):
        result = gemm_ceiling(precision, args.device)
        shapes = ", ".join(f"{s} {g:.0f}" for s, g in result["by_shape"].items())
        print(f"{precision}: ceiling {result['gflops']:.0f} GFLOP/s ({shapes}) on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
