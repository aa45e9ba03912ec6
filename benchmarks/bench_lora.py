"""LoRA fine-tuning speed, memory and quality: pocketlm against transformers + PEFT, same weights and batches.

Variants (each in its own subprocess, so its peak RSS / GPU peak belongs to it alone):

  pocketlm-lora   pocketlm.lora.prepare_model(method="lora") on pocketlm's GPT
  hf-peft         AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained(is_trainable=True)
  pocketlm-lora-ac  the same LoRA with activation checkpointing (each block recomputed in backward)
  pocketlm-lora-shared  the same LoRA with q/k/v and gate/up each run as one matmul
                  (lora.SHARE_INPUT_MATMULS on; off by default: slower on the CPU it was measured on)
  pocketlm-lora-compiled  the same LoRA with --compile-blocks (each block's training forward compiled;
                  the warm-up step pays the compile, its time printed as the first step)
  pocketlm-qlora  method="qlora": every block linear in NF4, adapters in fp32
  pocketlm-full   full fine-tune of the same model (for the memory comparison)

All start from the same base (smollm2-135m: the built-in GGUF's weights dequantized to fp32, or a random
SmolLM2-135M-shaped model with --random) saved as one model folder, and from the same initial adapter
(pocketlm writes it in PEFT's format; both sides load it), rank 8 on all linear layers of the blocks, and
train on the same tinyshakespeare windows with pocketlm.train.make_optimizer's AdamW and clipping, in
fp32 and with bf16 autocast. Validation loss is measured on the same held-out windows after training.
Tokens/s comes from the median step time; ratios between variants of one invocation are what to compare.

    python benchmarks/bench_lora.py                     # batch 8 x 256, 1 warm-up + 4 timed steps
    python benchmarks/bench_lora.py --quick             # batch 2 x 64: a smoke run
    python benchmarks/bench_lora.py --variants pocketlm-lora hf-peft --precisions bf16
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

from ceiling import linear_weights, measured_ceilings, step_flops_per_token  # benchmarks/ceiling.py

from pocketlm.memory import find_tcmalloc

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("pocketlm-lora", "hf-peft", "pocketlm-lora-ac", "pocketlm-qlora", "pocketlm-full", "pocketlm-lora-shared",
            "pocketlm-lora-compiled")
PRECISIONS = ("fp32", "bf16")


# -- the parent: base model, batches and initial adapter; run every variant; print the table ----------
def prepare(workdir: Path, args: argparse.Namespace) -> str:
    import torch
    from safetensors.torch import save_file

    from pocketlm import lora
    from pocketlm.io import save_model
    from pocketlm.io.folders import load_model_folder
    from pocketlm.io.peft import LoraSaver
    from pocketlm.model import GPT

    torch.manual_seed(args.seed)
    source = "random SmolLM2-135M-shaped weights"
    if args.random:
        from pocketlm.tokenizer import load_tokenizer

        model = GPT.from_name("smollm2-135m")
        tokenizer = load_tokenizer("smollm2")
    else:
        try:
            from pocketlm.io import load_model as load_base_model

            model, tokenizer = load_base_model("smollm2-135m")
            source = "smollm2-135m (built-in GGUF, dequantized to fp32)"
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to random weights, and say so
            print(f"cannot load smollm2-135m ({exc}): using random weights", file=sys.stderr)
            from pocketlm.tokenizer import load_tokenizer

            model, tokenizer = GPT.from_name("smollm2-135m"), load_tokenizer("smollm2")
    model = model.float()
    save_model(model, tokenizer, workdir / "model")
    args.linear_weights = linear_weights(model)  # FLOPs per token: 4x for a LoRA step, 6x for a full one

    B, T = args.batch, args.context
    text = (Path(os.environ.get("POCKETLM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "tinyshakespeare" / "input.txt").read_text()
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    n_train, n_val = args.warmup + args.steps, args.eval_batches
    need = (n_train + n_val) * B * (T + 1)
    if ids.numel() < need:
        raise SystemExit(f"tinyshakespeare has {ids.numel()} tokens, the run needs {need}: lower the sizes")
    train = ids[: n_train * B * (T + 1)].view(n_train, B, T + 1)
    val = ids[-n_val * B * (T + 1):].view(n_val, B, T + 1)  # the end of the text: never trained on
    save_file({"train": train.contiguous(), "val": val.contiguous()}, str(workdir / "batches.safetensors"))

    # One initial adapter (A random as PEFT initialises it, B = 0) for every variant.
    init, _ = load_model_folder(workdir / "model")
    info = lora.prepare_model(init, "lora", args.rank, args.alpha, 0.0, args.targets, base=workdir / "model")
    LoraSaver(base=workdir / "model").save(init, None, workdir / "init")
    return (f"base: {source}, {model.num_parameters() / 1e6:.1f}M parameters; LoRA rank {args.rank} alpha "
            f"{args.alpha} on {args.targets} ({info['trainable_params']:,} trainable); batch {B} x {T}; "
            f"{args.warmup} warm-up + {args.steps} timed steps; validation on {n_val} x {B} windows")


def run_variant(workdir: Path, variant: str, precision: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--precision", precision,
           "--workdir", str(workdir), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--lr", str(args.full_lr if variant == "pocketlm-full" else args.lr), "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--targets", args.targets,
           "--device", args.device, "--allocator", args.allocator] + (
               ["--threads", str(args.threads)] if args.threads else [])
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if args.allocator == "tcmalloc":
        if not find_tcmalloc():
            raise SystemExit("--allocator tcmalloc: not installed (apt-get install libgoogle-perftools4)")
        env["LD_PRELOAD"] = find_tcmalloc()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"variant": variant, "precision": precision,
                "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ceiling_share(r: dict, tokens_per_step: int, weights: int, ceilings: dict) -> float:
    """The variant's linear-layer GEMM rate as a share of this machine's measured ceiling (benchmarks/ceiling.py)."""
    flops = step_flops_per_token(weights, frozen_base=r["variant"] != "pocketlm-full")
    return flops * tokens_per_step / r["median_step_s"] / 1e9 / ceilings[r["precision"]]


def print_table(results: list[dict], tokens_per_step: int, weights: int, ceilings: dict) -> None:
    gib = 2**30
    print(f"\n{'variant':<22} {'prec':<5} {'tokens/s':>9} {'ceiling':>7} {'s/step':>7} {'cpu-s/step':>10} {'peak':>8} "
          f"{'at start':>8} {'w/ load':>8} {'val loss':>9} {'train loss first->last':>22}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<22} {r['precision']:<5} FAILED: {r['error']}")
            continue
        print(f"{r['variant']:<22} {r['precision']:<5} {tokens_per_step / r['median_step_s']:>9.1f} "
              f"{ceiling_share(r, tokens_per_step, weights, ceilings):>7.0%} "
              f"{r['median_step_s']:>7.2f} {r['cpu_s_per_step']:>10.2f} {r['peak_bytes'] / gib:>6.2f}GB "
              f"{r['start_bytes'] / gib:>6.2f}GB {r['process_peak_bytes'] / gib:>6.2f}GB {r['val_loss']:>9.4f} "
              f"{r['losses'][0]:>10.4f}->{r['losses'][-1]:.4f}")
    ok = {(r["variant"], r["precision"]): r for r in results if "error" not in r}
    print(f"\nceiling = linear-layer FLOPs done per second (LoRA 4 x {weights / 1e6:.1f}M weights a token, full 6 x)"
          f"\nas a share of this machine's GEMM ceiling measured in this run: "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in ceilings.items()))
    print("peak = peak RSS (CUDA: peak allocated) while training; at start = before the first step; w/ load ="
          "\nprocess peak including model loading. Ratios: same precision, same invocation; 'cpu' compares"
          "\nCPU seconds per step, steadier than wall time when other processes share the cores.")
    pairs = [("pocketlm-lora", "hf-peft"), ("pocketlm-lora-ac", "hf-peft"), ("pocketlm-qlora", "hf-peft"),
             ("pocketlm-qlora", "pocketlm-lora"), ("pocketlm-lora", "pocketlm-full"),
             ("pocketlm-lora-shared", "pocketlm-lora"), ("pocketlm-lora-compiled", "hf-peft"),
             ("pocketlm-lora-compiled", "pocketlm-lora")]
    for prec in PRECISIONS:
        for a, b in pairs:
            if (a, prec) in ok and (b, prec) in ok:
                ra, rb = ok[(a, prec)], ok[(b, prec)]
                print(f"  {a + '/' + b:<30} {prec}: speed x{rb['median_step_s'] / ra['median_step_s']:.2f} "
                      f"(cpu x{rb['cpu_s_per_step'] / ra['cpu_s_per_step']:.2f})  "
                      f"peak memory x{ra['peak_bytes'] / rb['peak_bytes']:.2f}  "
                      f"val loss {ra['val_loss']:.4f} vs {rb['val_loss']:.4f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--eval-batches", type=int, default=2, help="validation batches after training")
    p.add_argument("--lr", type=float, default=1e-3, help="adapters' learning rate (as the shakespeare-lora recipe)")
    p.add_argument("--full-lr", type=float, default=1e-4,
                   help="pocketlm-full's learning rate (as shakespeare-full: 1e-3 makes a full fine-tune diverge)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--random", action="store_true", help="random SmolLM2-135M-shaped weights, not the GGUF's")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--allocator", choices=("auto", "glibc", "glibc-tuned", "tcmalloc"), default="auto",
                   help="host allocator of every worker, both sides alike (default auto: what the pocketlm "
                        "command uses here, tcmalloc if installed, else glibc-tuned)")
    p.add_argument("--quick", action="store_true", help="batch 2 x 64, 1 warm-up + 2 timed steps")
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.batch, args.context, args.warmup, args.steps = 2, 64, 1, 2
    if args.allocator == "auto":
        args.allocator = "tcmalloc" if find_tcmalloc() else "glibc-tuned"
    print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min) on {os.cpu_count()} CPUs",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_lora.") as tmp:
        workdir = Path(tmp)
        print(prepare(workdir, args), flush=True)
        ceilings = measured_ceilings(args.precisions, threads=args.threads, device=args.device,
                                     preload=find_tcmalloc() if args.allocator == "tcmalloc" else None)
        for precision in args.precisions:
            for variant in args.variants:  # variants alternate innermost: load changes hit all alike
                r = run_variant(workdir, variant, precision, args)
                note = r["error"] if "error" in r else f"{r['median_step_s']:.2f} s/step, first step {r['step_s'][0]:.1f} s"
                print(f"  {variant} {precision}: {note}", flush=True)
                results.append(r)
    print_table(results, args.batch * args.context, args.linear_weights, ceilings)
    print(f"allocator (every worker alike): {args.allocator} -- peak RSS and speed depend on it "
          "(--allocator auto | glibc | glibc-tuned | tcmalloc)")
    print(f"\nload after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


# -- a worker: one variant at one precision ------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    """Start the training peak from here: hand freed heap back to the OS, then reset VmHWM.

    Loading a model briefly holds extra copies (file buffers, fp32 weights before NF4); that is not
    fine-tuning memory, so the peak that counts is the one reached while training.
    """
    import gc

    from pocketlm.memory import release_free_memory

    gc.collect()
    release_free_memory()  # glibc: malloc_trim; tcmalloc: ReleaseFreeMemory -- both sides alike
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak resident set size
    except OSError:
        pass


def worker(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file

    from pocketlm.device import autocast
    from pocketlm.recipe import TrainConfig
    from pocketlm.train import make_optimizer, trainer_on_windows

    if args.allocator == "glibc-tuned":
        from pocketlm.memory import tune_allocator

        tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    device = torch.device(args.device)
    batches = load_file(str(workdir / "batches.safetensors"))
    trainer = None
    if args.worker.startswith("pocketlm"):
        # pocketlm's side is the Trainer users run: its step() (accumulation, autocast, clip, AdamW).
        from pocketlm import lora
        from pocketlm.io.folders import load_model_folder
        from pocketlm.io.peft import LoraSaver

        model, tokenizer = load_model_folder(workdir / "model")
        lora.SHARE_INPUT_MATMULS = args.worker == "pocketlm-lora-shared"
        if args.worker != "pocketlm-full":
            method = "qlora" if args.worker == "pocketlm-qlora" else "lora"
            lora.prepare_model(model, method, args.rank, args.alpha, 0.0, args.targets)
            LoraSaver().load(model, workdir / "init")  # the shared initial adapter
        trainer = trainer_on_windows(
            model, tokenizer, batches["train"], val_windows=batches["val"], lr=args.lr, steps=len(batches["train"]),
            out=workdir / f"run-{args.worker}-{args.precision}", device=args.device, precision=args.precision,
            weight_decay=0.0, activation_checkpointing=args.worker == "pocketlm-lora-ac",
            compile_blocks=args.worker == "pocketlm-lora-compiled")
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, workdir / "init" / "adapter", is_trainable=True)
        model.to(device).train()
        opt = make_optimizer(model, TrainConfig(lr=args.lr, weight_decay=0.0), device)
        params = [q for q in model.parameters() if q.requires_grad]

        def step_loss(x, y):  # HF's own loss path; y is already shifted, as ours
            return model(input_ids=x, labels=y, shift_labels=y).loss

        def hf_step(x, y) -> float:
            opt.zero_grad(set_to_none=True)
            with autocast(device, args.precision):
                loss = step_loss(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss.item()
    cuda = device.type == "cuda"
    # Not ru_maxrss: a child process inherits its parent's peak through fork + exec (Linux keeps the
    # larger of the two), and this parent held the GGUF model. VmHWM belongs to this process's own memory.
    load_peak = _status_bytes("VmHWM")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    start_bytes = torch.cuda.memory_allocated(device) if cuda else _status_bytes("VmRSS")
    losses, times, cpu = [], [], []
    train = batches["train"]
    for i in range(train.shape[0]):
        t0, c0 = time.perf_counter(), time.process_time()
        if trainer is not None:
            losses.append(trainer.step()["train_loss"])
        else:
            x, y = train[i, :, :-1].contiguous().to(device), train[i, :, 1:].contiguous().to(device)
            losses.append(hf_step(x, y))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _status_bytes("VmHWM")
    process_peak = max(load_peak, _status_bytes("VmHWM"))  # loading included
    if trainer is not None:
        val_loss = trainer.evaluate()["val_loss"]
        trainer.cleanup()
    else:
        model.eval()
        with torch.no_grad(), autocast(device, args.precision):
            val_loss = statistics.fmean(step_loss(v[:, :-1].contiguous().to(device),
                                                  v[:, 1:].contiguous().to(device)).item() for v in batches["val"])
    timed = times[args.warmup:]
    print(json.dumps({
        "variant": args.worker, "precision": args.precision, "median_step_s": statistics.median(timed),
        "cpu_s_per_step": statistics.fmean(cpu[args.warmup:]), "peak_bytes": peak,
        "train_bytes": max(0, peak - start_bytes), "start_bytes": start_bytes, "process_peak_bytes": process_peak,
        "val_loss": val_loss, "losses": losses,
        "step_s": times, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
