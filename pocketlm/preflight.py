"""Checks a training runs before its first step, so that a mistake is the last line printed, not a
progress bar, and is found before minutes of training rather than at the first evaluation.

Everything the loop would refuse later is refused here: the precision, the contexts of the schedule
against the model and the data, the batch arithmetic at every context, and a validation split that can
hold one window.
"""

from __future__ import annotations

from pathlib import Path

from pocketlm.atomic import check_output_dir
from pocketlm.data.batches import TokenSplit
from pocketlm.device import PRECISIONS
from pocketlm.distributed import accumulation_steps
from pocketlm.errors import UserError
from pocketlm.recipe import TrainConfig


def contexts_used(cfg: TrainConfig, model_context: int) -> list[int]:
    """Every context the run trains at (one, or each of the schedule's)."""
    if cfg.context_schedule:
        return sorted({int(c) for _, c in cfg.context_schedule})
    return [cfg.context_at(0, model_context)]


def check_run_dir(out: str | Path) -> None:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the run (e.g. runs/NAME)")
    check_output_dir(out, "--out")


def check_before_training(cfg: TrainConfig, block_size: int, train_split: TokenSplit, val_split: TokenSplit,
                          world: int) -> None:
    check_run_dir(cfg.out)
    if cfg.precision != "auto" and cfg.precision not in PRECISIONS:
        raise UserError(f"unknown precision {cfg.precision!r}: choose one of auto, {', '.join(PRECISIONS)}")
    if val_split.tokens < 2:  # one window needs an input token and its target
        raise UserError(f"the data set {cfg.data} has no validation split (prepared with --val-fraction 0?): "
                        "training evaluates on it: prepare it again with --val-fraction 0.1 or --val-documents K")
    model_context = min(block_size, train_split.tokens - 1)
    for context in contexts_used(cfg, model_context):
        flag = "a context in context_schedule" if cfg.context_schedule else "--context"
        if context < 1:
            raise UserError(f"{flag} must be positive, got {context}")
        if context > block_size:
            raise UserError(f"{flag} {context} is longer than the model's context of {block_size} tokens: use at "
                            f"most {block_size}")
        if context > train_split.tokens - 1:
            raise UserError(f"{flag} {context} is longer than the training split of {cfg.data} "
                            f"({train_split.tokens} tokens): lower it, or prepare more data")
        accumulation_steps(cfg.batch_tokens, context, cfg.micro_batch, world)
