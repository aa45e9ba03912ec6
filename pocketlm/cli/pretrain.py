"""`pocketlm pretrain`: train a model from scratch on a prepared data set."""

from __future__ import annotations

import argparse
import json

from pocketlm.cli.common import HelpFormatter
from pocketlm.recipe import add_train_arguments, config_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="train a model from scratch",
        description="Train a named model config from random weights. Flags override the --config recipe.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", help="named model config (see `pocketlm models`)")
    p.add_argument("--pad-vocab", type=int, default=None, metavar="N",
                   help="pad the embedding to a multiple of N rows (64 is faster on GPUs)")
    add_train_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm.train import pretrain

    summary = pretrain(config_from_args(args, model=args.model, method="pretrain"), pad_vocab=args.pad_vocab)
    print(json.dumps({k: summary[k] for k in ("steps", "best_val_loss", "final_train_loss", "tokens_per_s",
                                              "wall_s")}))
