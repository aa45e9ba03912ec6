"""Training speed and memory: pocketlm's GPT against Hugging Face's GPT2LMHeadModel, on this CPU.

Both sides start from the same weights (ours saved with pocketlm.io.save_model, loaded by
transformers.AutoModelForCausalLM.from_pretrained), train on the same batches (tinyshakespeare, or
random tokens) with the same AdamW (pocketlm.train.make_optimizer) and gradient clipping, in fp32
and with bf16 autocast, under each host allocator:

  glibc        the system malloc as it comes
  glibc-tuned  pocketlm.memory.tune_allocator() (mallopt: no mmap for big blocks, no trimming)
  tcmalloc     LD_PRELOAD of libtcmalloc (Debian: apt-get install libgoogle-perftools4)

Every (side, precision, allocator) runs in its own subprocess, so peak RSS (ru_maxrss) and page
faults (ru_minflt) belong to that run alone. Tokens/s is taken from the median step time, which
shrugs off a neighbour's burst on a shared machine; ratios between runs of one invocation are what
to compare.

    python benchmarks/bench_train.py --quick            # a few seconds' smoke run
    python benchmarks/bench_train.py                    # gpt2 (124M), batch 8 x 256, all variants
    python benchmarks/bench_train.py --allocators glibc-tuned --precisions fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ceiling import linear_weights, measured_ceilings, step_flops_per_token  # benchmarks/ceiling.py

from pocketlm.memory import find_tcmalloc

REPO = Path(__file__).resolve().parents[1]
SIDES = ("pocketlm", "hf", "pocketlm-compiled")  # the last: --compile-blocks (not run unless named)
PRECISIONS = ("fp32", "bf16")
ALLOCATORS = ("glibc", "glibc-tuned", "tcmalloc")


# -- the parent: prepare weights and batches, run every variant, print the table -------------------
def prepare(workdir: Path, args: argparse.Namespace) -> int:
    """Save the model and the batches the workers train on; return the batches' token count."""
    import torch
    from safetensors.torch import save_file

    from pocketlm.io import save_model
    from pocketlm.model import GPT
    from pocketlm.tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    model = GPT.from_name(args.model)
    tokenizer = load_tokenizer("gpt2")
    save_model(model, tokenizer, workdir / "model")
    n_batches = args.warmup + args.steps
    need = n_batches * args.batch * (args.context + 1)
    text_path = (Path(os.environ.get("POCKETLM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "tinyshakespeare" / "input.txt")
    if args.data == "tinyshakespeare" and text_path.exists():
        ids = tokenizer.encode(text_path.read_text())
        if len(ids) < need:
            raise SystemExit(f"tinyshakespeare has {len(ids)} tokens, the run needs {need}: lower --steps/--batch")
        tokens = torch.tensor(ids[:need], dtype=torch.int64)
        source = "tinyshakespeare"
    else:
        tokens = torch.randint(0, model.config.vocab_size, (need,), generator=torch.Generator().manual_seed(args.seed))
        source = "random tokens"
    # Consecutive windows: x = tokens[i : i+T], y = tokens[i+1 : i+T+1].
    windows = tokens.view(n_batches, args.batch, args.context + 1)
    save_file({"windows": windows.contiguous()}, str(workdir / "batches.safetensors"))
    args.linear_weights = linear_weights(model)
    print(f"model {args.model} ({model.num_parameters() / 1e6:.1f}M parameters), data: {source}, "
          f"batch {args.batch} x {args.context}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"torch threads {args.threads or torch.get_num_threads()}", flush=True)
    return need


def run_variant(workdir: Path, side: str, precision: str, allocator: str, tcmalloc: str | None,
                args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["POCKETLM_TUNE_ALLOCATOR"] = "0"  # the worker decides (see worker())
    if allocator == "tcmalloc":
        env["LD_PRELOAD"] = tcmalloc or ""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--precision", precision,
           "--allocator", allocator, "--workdir", str(workdir), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--lr", str(args.lr), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"side": side, "precision": precision, "allocator": allocator,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_rounds(runs: list[dict]) -> dict:
    """One variant's rounds as one result: all timed steps pooled, the worst peak, the mean faults."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    steps = [t for r in runs for t in r["step_s"]]
    cpu = [t for r in runs for t in r["cpu_step_s"]]
    return {**runs[0], "best_step_s": min(steps), "median_step_s": statistics.median(steps),
            "best_cpu_s": min(cpu), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "minor_faults_per_step": statistics.fmean(r["minor_faults_per_step"] for r in runs),
            "sys_s_per_step": statistics.fmean(r["sys_s_per_step"] for r in runs), "rounds": len(runs)}


def print_table(results: list[dict], tokens_per_step: int, weights: int, ceilings: dict) -> None:
    flops = step_flops_per_token(weights, frozen_base=False)
    print("\ntokens/s from the best timed step (least disturbed by other processes) and the median one; CPU "
          "seconds of the best step (all threads); sys: kernel time, mostly page faults;\nceiling: the median "
          f"step's linear-layer FLOPs (6 x {weights / 1e6:.1f}M weights a token) per second as a share of the GEMM "
          "ceiling measured in this run (" + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in ceilings.items()) + ")")
    print(f"{'side':<9} {'precision':<9} {'allocator':<12} {'tok/s best':>10} {'tok/s med':>9} {'ceiling':>7} {'cpu-s/step':>10} "
          f"{'sys-s/step':>10} {'peak RSS':>9} {'faults/step':>11} {'loss first->last':>17}")
    for r in results:
        if "error" in r:
            print(f"{r['side']:<9} {r['precision']:<9} {r['allocator']:<12} FAILED: {r['error']}")
            continue
        print(f"{r['side']:<9} {r['precision']:<9} {r['effective_allocator']:<12} "
              f"{tokens_per_step / r['best_step_s']:>10.1f} {tokens_per_step / r['median_step_s']:>9.1f} "
              f"{flops * tokens_per_step / r['median_step_s'] / 1e9 / ceilings[r['precision']]:>7.0%} "
              f"{r['best_cpu_s']:>10.2f} "
              f"{r['sys_s_per_step']:>10.2f} {r['peak_rss_bytes'] / 2**30:>7.2f}GB {r['minor_faults_per_step']:>11,.0f} "
              f"{r['losses'][0]:>8.3f}->{r['losses'][-1]:.3f}")

    ok = {(r["side"], r["precision"], r["allocator"]): r for r in results if "error" not in r}

    def compare(label: str, a: tuple, b: tuple, loss: bool = False) -> None:
        """Speed of run a over run b: best steps (median steps, CPU time of the best steps)."""
        if a not in ok or b not in ok:
            return
        ra, rb = ok[a], ok[b]
        line = (f"  {label:<40} speed x{rb['best_step_s'] / ra['best_step_s']:.2f} "
                f"(med x{rb['median_step_s'] / ra['median_step_s']:.2f}, cpu x{rb['best_cpu_s'] / ra['best_cpu_s']:.2f})  "
                f"memory x{ra['peak_rss_bytes'] / rb['peak_rss_bytes']:.2f}  "
                f"faults x{ra['minor_faults_per_step'] / max(1.0, rb['minor_faults_per_step']):.2f}")
        if loss:
            diff = max(abs(x - y) for x, y in zip(ra["losses"], rb["losses"], strict=True))
            line += f"  max |loss diff| {diff:.4f}"
        print(line)

    allocators = sorted({k[2] for k in ok}, key=ALLOCATORS.index)
    print("\nratios (a/b, same run):")
    for alloc in allocators:
        for prec in PRECISIONS:
            compare(f"pocketlm/hf {prec} [{alloc}]", ("pocketlm", prec, alloc), ("hf", prec, alloc), loss=True)
            compare(f"pocketlm-compiled/hf {prec} [{alloc}]", ("pocketlm-compiled", prec, alloc), ("hf", prec, alloc),
                    loss=True)
    for alloc in allocators:
        for side in SIDES:
            compare(f"bf16/fp32 {side} [{alloc}]", (side, "bf16", alloc), (side, "fp32", alloc), loss=True)
    for alloc in allocators[1:]:
        for side in SIDES:
            for prec in PRECISIONS:
                compare(f"{alloc}/glibc {side} {prec}", (side, prec, alloc), (side, prec, "glibc"))
    for prec in PRECISIONS:  # as each ships: the pocketlm CLI tunes glibc, transformers leaves it alone
        compare(f"pocketlm [glibc-tuned]/hf [glibc] {prec}", ("pocketlm", prec, "glibc-tuned"), ("hf", prec, "glibc"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="named pocketlm GPT-2 config (default gpt2, 124M)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator and caches warm up)")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice)")
    p.add_argument("--data", choices=("tinyshakespeare", "random"), default="tinyshakespeare")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=["pocketlm", "hf"])
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    p.add_argument("--rounds", type=int, default=1, help="run every variant this many times, interleaved")
    p.add_argument("--quick", action="store_true", help="batch 2 x 64, 1 warm-up + 2 timed steps")
    p.add_argument("--json", help="also write the raw results to this file")
    # worker mode (internal)
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    p.add_argument("--allocator", choices=ALLOCATORS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.batch, args.context, args.warmup, args.steps = 2, 64, 1, 2
    tcmalloc = find_tcmalloc()
    allocators = list(args.allocators)
    if "tcmalloc" in allocators and tcmalloc is None:
        print("tcmalloc not found (apt-get install libgoogle-perftools4): skipping it", file=sys.stderr)
        allocators.remove("tcmalloc")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1/5/15 min) on {os.cpu_count()} CPUs", flush=True)
    runs: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args)
        ceilings = measured_ceilings(args.precisions, threads=args.threads or None,
                                     preload=tcmalloc if "tcmalloc" in allocators else None)
        # Sides alternate innermost, rounds outermost, so a change in the machine's load hits all alike.
        for rnd in range(args.rounds):
            for allocator in allocators:
                for precision in args.precisions:
                    for side in args.sides:
                        r = run_variant(workdir, side, precision, allocator, tcmalloc, args)
                        note = r.get("error") or "s/step " + " ".join(f"{t:.2f}" for t in r["step_s"])
                        print(f"  round {rnd + 1}: {side} {precision} {allocator}: {note}", flush=True)
                        runs.setdefault((side, precision, allocator), []).append(r)
    results = [merge_rounds(v) for v in runs.values()]
    print_table(results, args.batch * args.context, args.linear_weights, ceilings)
    print(f"\nload after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


# -- a worker: one side, one precision, one allocator -----------------------------------------------
def worker(args: argparse.Namespace) -> None:
    if args.allocator == "glibc-tuned":
        os.environ["POCKETLM_TUNE_ALLOCATOR"] = "1"
        from pocketlm.memory import tune_allocator

        tune_allocator()
    import torch
    from safetensors.torch import load_file

    from pocketlm.device import autocast
    from pocketlm.memory import allocator_in_effect
    from pocketlm.recipe import TrainConfig
    from pocketlm.train import make_optimizer, trainer_on_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    device = torch.device("cpu")
    windows = load_file(str(workdir / "batches.safetensors"))["windows"]
    n_steps = args.warmup + args.steps
    if args.worker.startswith("pocketlm"):
        # pocketlm's side is the Trainer users run: its step() (autocast, clip, AdamW), nothing rebuilt here.
        from pocketlm.io.folders import load_model_folder

        model, tokenizer = load_model_folder(workdir / "model")
        trainer = trainer_on_windows(model, tokenizer, windows[:n_steps], lr=args.lr, steps=n_steps,
                                     out=workdir / f"run-{args.precision}-{args.allocator}", device="cpu",
                                     precision=args.precision, compile_blocks=args.worker == "pocketlm-compiled")

        def train_step(i: int) -> float:
            return trainer.step()["train_loss"]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
        model.train()
        opt = make_optimizer(model, TrainConfig(lr=args.lr), device)

        def train_step(i: int) -> float:  # HF's own loss path; shift_labels: y is already shifted, as ours
            x, y = windows[i, :, :-1].contiguous(), windows[i, :, 1:].contiguous()
            opt.zero_grad(set_to_none=True)
            with autocast(device, args.precision):
                loss = model(input_ids=x, labels=y, shift_labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.item()
    losses, times, cpu = [], [], []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(n_steps):
        if i == args.warmup:
            before = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(train_step(i))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timed = times[args.warmup:]
    print(json.dumps({
        "side": args.worker, "precision": args.precision, "allocator": args.allocator,
        "effective_allocator": allocator_in_effect(),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "minor_faults_per_step": (usage.ru_minflt - before.ru_minflt) / args.steps,
        "sys_s_per_step": (usage.ru_stime - before.ru_stime) / args.steps,
        "losses": losses, "step_s": timed, "cpu_step_s": cpu[args.warmup:],
    }))


if __name__ == "__main__":
    main()
