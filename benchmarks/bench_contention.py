"""A LoRA training step with and without a busy neighbour: threads and OpenMP wait policy on a shared machine.

On a 2-core laptop the user's editor, browser or a second job shares the cores. One measurement had a
2-thread LoRA step fall from about 500 to about 80 tokens/s beside one busy process: far more than the
lost core explains. This script measures it: the same Trainer step (smollm2-135m-shaped, LoRA rank 8 on
all linear layers, bf16 where the CPU runs it, else fp32) in a fresh process per setting, alone and beside
N processes that spin (`--neighbours`), over torch threads (`--threads`) and OMP_WAIT_POLICY
(unset = the OpenMP runtime's default; passive = waiting threads sleep at once instead of spinning).

    python benchmarks/bench_contention.py                    # threads 2 and 1, policy default and passive
    python benchmarks/bench_contention.py --steps 6 --batch 8 --context 256

Each row: tokens/s of the median timed step, and the ratio to the same setting alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def run_setting(threads: int, policy: str, args: argparse.Namespace, workdir: Path) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy.upper()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads),
           "--batch", str(args.batch), "--context", str(args.context), "--steps", str(args.steps),
           "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(args: argparse.Namespace) -> None:
    import torch
    from lora_step import lora_trainer

    torch.set_num_threads(args.threads)
    trainer, precision = lora_trainer(Path(args.workdir) / f"run-{os.getpid()}", batch=args.batch,
                                      context=args.context, steps=args.steps + 1)
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t0)
    trainer.cleanup()
    print(json.dumps({"step_s": statistics.median(times[1:]), "precision": precision}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--policies", nargs="+", choices=("default", "passive", "active"), default=["default", "passive"])
    p.add_argument("--neighbours", type=int, default=1, help="busy processes beside the step (0: alone only)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return
    print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)
    tokens = args.batch * args.context
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_contention.") as tmp:
        for threads, policy in itertools.product(args.threads, args.policies):
            alone = run_setting(threads, policy, args, Path(tmp))
            stop = multiprocessing.Event()
            spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(args.neighbours)]
            for s in spinners:
                s.start()
            try:
                busy = run_setting(threads, policy, args, Path(tmp)) if spinners else alone
            finally:
                stop.set()
                for s in spinners:
                    s.join()
            rows.append((threads, policy, alone, busy))
            print(f"  threads {threads}, OMP_WAIT_POLICY {policy}: alone {alone}, beside {args.neighbours}: {busy}",
                  flush=True)
    print(f"\nLoRA step, smollm2-135m shape, batch {args.batch} x {args.context}, tokens/s of the median step")
    print(f"{'threads':>7} {'OMP_WAIT_POLICY':<16} {'alone':>8} {f'beside {args.neighbours} busy':>16} {'ratio':>6}")
    for threads, policy, alone, busy in rows:
        if "error" in alone or "error" in busy:
            print(f"{threads:>7} {policy:<16} FAILED: {alone.get('error') or busy.get('error')}")
            continue
        a, b = tokens / alone["step_s"], tokens / busy["step_s"]
        print(f"{threads:>7} {policy:<16} {a:>8.0f} {b:>16.0f} {b / a:>6.2f}")
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
