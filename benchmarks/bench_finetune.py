"""Full fine-tuning speed and memory: pocketlm's model vs transformers' LlamaForCausalLM, same weights and batch.

    python benchmarks/bench_finetune.py                      # smollm2-135m, context 256, batch 8, CPU
    python benchmarks/bench_finetune.py --device cuda --batch 16 --steps 10

The base is exported once to a temporary Hugging Face folder; each side then runs in its own subprocess
(so peak memory, ru_maxrss on CPU, is not polluted by the other) and loads that folder: pocketlm with
pocketlm.io.load_model and drives pocketlm.train.Trainer.step() (what `pocketlm finetune` runs), transformers
loads it with AutoModelForCausalLM and runs a plain loop: AdamW, forward, cross-entropy in fp32, backward, step; the first `--warmup` steps are not timed. The loss of
the first step is printed for both: equal weights and batch give equal losses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _reset_peak(device: torch.device) -> bool:
    """Forget the loading phase's peak, so the figure is the training loop's (Linux: clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _train_peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _batch(tokenizer, vocab: int, batch: int, context: int, seed: int) -> torch.Tensor:
    """(batch, context + 1) token windows: Shakespeare if ../shared/data has it, else random ids."""
    text_path = (Path(os.environ.get("POCKETLM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "tinyshakespeare" / "input.txt")
    need = batch * (context + 1)
    if text_path.exists():
        ids = tokenizer.encode(text_path.read_text()[: need * 8])
        if len(ids) >= need:
            return torch.tensor(ids[:need]).view(batch, context + 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, context + 1), generator=g)


def run_side(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pocketlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.folder)
    t0 = time.perf_counter()
    if args.side == "pocketlm":
        # pocketlm's side is the Trainer users run (AdamW, no clipping, fp32 here): its step(), not a copy.
        from pocketlm.io import load_model
        from pocketlm.train import trainer_on_windows

        model, _ = load_model(args.folder, device="cpu", dtype=torch.float32)
        load_s = time.perf_counter() - t0
        window = _batch(tokenizer, model.config.vocab_size, args.batch, args.context, args.seed)
        trainer = trainer_on_windows(model, tokenizer, window[None], lr=args.lr, steps=args.warmup + args.steps,
                                     out=Path(args.folder).parent / "pocketlm-run", device=args.device,
                                     precision="fp32", weight_decay=0.0, grad_clip=0.0)

        def train_step() -> float:
            return trainer.step()["train_loss"]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).to(device)
        load_s = time.perf_counter() - t0
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                      weight_decay=0.0)
        window = _batch(tokenizer, model.config.vocab_size, args.batch, args.context, args.seed).to(device)
        x, y = window[:, :-1], window[:, 1:]

        def train_step() -> float:
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()  # .item() synchronizes
    reset = _reset_peak(device)
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(train_step())
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    tokens = args.batch * args.context
    return {
        "side": args.side, "load_s": round(load_s, 2), "first_loss": round(losses[0], 5),
        "step_s": round(sum(times) / len(times), 3), "tokens_per_s": round(tokens * len(times) / sum(times), 1),
        "peak_train_bytes": _train_peak_bytes(device) if reset else None,
        "peak_process_bytes": _peak_bytes(device),
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m", help="any pocketlm model source")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=["pocketlm", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return

    from pocketlm.io import load_model, save_model

    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        model, tokenizer = load_model(args.base)
        save_model(model, tokenizer, Path(tmp) / "base")
        del model
        results = []
        for side in ("pocketlm", "transformers"):
            cmd = [sys.executable, __file__, "--side", side, "--folder", str(Path(tmp) / "base")]
            for key in ("context", "batch", "steps", "warmup", "lr", "device", "threads", "seed"):
                cmd += [f"--{key}", str(getattr(args, key))]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    ours, theirs = results
    mib = 1024 * 1024
    print(f"full fine-tuning, {args.base}, context {args.context}, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup} warm-up, device {args.device}, threads {args.threads or torch.get_num_threads()}")
    print(f"{'':14}{'tokens/s':>10}{'s/step':>9}{'train peak MiB':>16}{'process peak MiB':>18}{'first loss':>12}")
    for r in results:
        train_peak = f"{r['peak_train_bytes'] / mib:,.0f}" if r["peak_train_bytes"] else "n/a"
        print(f"{r['side']:14}{r['tokens_per_s']:>10,.1f}{r['step_s']:>9.2f}{train_peak:>16}"
              f"{r['peak_process_bytes'] / mib:>18,.0f}{r['first_loss']:>12.4f}")
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    mem = ours["peak_process_bytes"] / theirs["peak_process_bytes"]
    print(f"pocketlm / transformers: speed {ratio:.2f}x, process peak memory {mem:.2f}x")
    print(json.dumps({"pocketlm": ours, "transformers": theirs, "speed_ratio": round(ratio, 3),
                      "memory_ratio": round(mem, 3)}))


if __name__ == "__main__":
    main()
