"""`pocketlm demo`: the main job on the built-in default (Shakespeare), end to end."""

from __future__ import annotations

import argparse

from pocketlm.cli.common import HelpFormatter


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the main job: from scratch vs fine-tuned on Shakespeare, side by side",
        description="Prepare the built-in Shakespeare corpus, pretrain a small GPT from scratch, fine-tune "
                    "pretrained bases, evaluate them and print samples. Stages already done are skipped.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="folder for data, runs and results")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--scratch-steps", type=int, default=None, help="override the from-scratch recipe's steps")
    p.add_argument("--finetune-steps", type=int, default=None, help="override the fine-tuning recipes' steps")
    p.add_argument("--skip-finetune", action="store_true", help="only the from-scratch row (no pretrained base)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm.demo import run_demo

    run_demo(args.out, device=args.device, scratch_steps=args.scratch_steps, finetune_steps=args.finetune_steps,
             skip_finetune=args.skip_finetune)
