"""Where a LoRA training step's time goes: torch.profiler over the Trainer step users run.

smollm2-135m-shaped weights (random: the shapes decide the time), LoRA rank 8 on all linear layers, batch
8 x 256, bf16 where the CPU runs it natively; one warm-up step, then `--steps` profiled steps. Prints the
operators by self CPU time, and the share of matrix multiplies (aten::mm/addmm/bmm and the attention
kernels) in the step.

    python benchmarks/profile_lora.py
    python benchmarks/profile_lora.py --shared       # q/k/v and gate/up each as one matmul
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
           "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--shared", action="store_true", help="lora.SHARE_INPUT_MATMULS on")
    args = p.parse_args()
    import torch
    from lora_step import lora_trainer
    from torch.profiler import ProfilerActivity, profile

    from pocketlm import lora

    lora.SHARE_INPUT_MATMULS = args.shared
    with tempfile.TemporaryDirectory() as tmp:
        trainer, precision = lora_trainer(Path(tmp) / "run", batch=args.batch, context=args.context,
                                          steps=args.steps + 1)
        trainer.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                trainer.step()
        trainer.cleanup()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"precision {precision}, batch {args.batch} x {args.context}, {torch.get_num_threads()} threads: "
          f"matmuls {matmul / total:.0%} of self CPU time, {total / args.steps / 1e6:.2f} s per step in ops")


if __name__ == "__main__":
    main()
