"""Does torch.compile pay on this CPU? A LoRA training step eager, with each block compiled, and whole.

Whole-model compilation of smollm2's LoRA step once took minutes on 2 cores and did not finish. This script
times, in a fresh process per variant (so nothing is cached between them beyond inductor's disk cache,
which `--fresh-cache` points to an empty folder):

  eager          the Trainer step as users run it (no compile)
  block          torch.compile(block, dynamic=False) on each transformer block (one graph, reused 30x)
  block-max      the same with mode="max-autotune-no-cudagraphs"
  whole          torch.compile(model, dynamic=False), what `--compile` does

Each row: the first step's time (compilation included), the median of the timed steps after it, and
whether it finished within `--timeout` seconds.

    python benchmarks/bench_compile.py --variants eager block whole
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("eager", "block", "block-max", "whole")


def worker(args: argparse.Namespace) -> None:
    from lora_step import lora_trainer

    def compile_blocks(model) -> None:
        if args.variant.startswith("block"):
            mode = "max-autotune-no-cudagraphs" if args.variant == "block-max" else None
            for block in model.transformer.h:
                block.compile(dynamic=False, mode=mode)  # nn.Module.compile: the module stays in place

    trainer, precision = lora_trainer(Path(args.workdir) / f"run-{args.variant}", batch=args.batch,
                                      context=args.context, steps=args.steps + 1, model_name=args.model,
                                      prepare=compile_blocks, compile=args.variant == "whole")
    times, losses = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        losses.append(trainer.step()["train_loss"])
        times.append(time.perf_counter() - t0)
    trainer.cleanup()
    print(json.dumps({"first_s": times[0], "step_s": statistics.median(times[1:]), "losses": losses,
                      "precision": precision}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--timeout", type=int, default=600, help="seconds a variant may take in all")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)
    tokens = args.batch * args.context
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_compile.") as tmp:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"))  # cold: compile is measured
        for variant in args.variants:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--model", args.model,
                   "--batch", str(args.batch), "--context", str(args.context), "--steps", str(args.steps),
                   "--workdir", tmp]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                result = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                          {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]})
            except subprocess.TimeoutExpired:
                result = {"error": f"did not finish in {args.timeout} s"}
            result["wall_s"] = time.perf_counter() - t0
            rows.append((variant, result))
            print(f"  {variant}: {result}", flush=True)
    eager = dict(rows).get("eager", {})
    print(f"\nLoRA step ({args.model}, rank 8 all-linear, batch {args.batch} x {args.context}); tokens/s of the "
          "median step after the first")
    print(f"{'variant':<10} {'first step s':>12} {'tokens/s':>9} {'vs eager':>8} {'process s':>9}  loss first->last")
    for variant, r in rows:
        if "error" in r:
            print(f"{variant:<10} FAILED after {r['wall_s']:.0f} s: {r['error']}")
            continue
        ratio = f"{eager['step_s'] / r['step_s']:>8.2f}" if "step_s" in eager else f"{'':>8}"
        print(f"{variant:<10} {r['first_s']:>12.1f} {tokens / r['step_s']:>9.0f} {ratio} {r['wall_s']:>9.0f}  "
              f"{r['losses'][0]:.4f}->{r['losses'][-1]:.4f}")
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
