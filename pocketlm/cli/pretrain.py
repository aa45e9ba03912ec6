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


def build_model(name: str, data_dir: str, seed: int, pad_vocab: int | None = None):
    """A freshly initialised model whose vocabulary is the data set's tokenizer."""
    import torch  # imported here so that `pocketlm --help` and light commands start fast

    from pocketlm.data.batches import read_manifest
    from pocketlm.model import GPT, get_config
    from pocketlm.tokenizer import load_tokenizer

    read_manifest(data_dir)  # a clear error if DIR is not a prepared data set
    tokenizer = load_tokenizer(data_dir)
    vocab = tokenizer.vocab_size
    padded = -(-vocab // pad_vocab) * pad_vocab if pad_vocab else None
    config = get_config(name, vocab_size=vocab, padded_vocab_size=padded, tokenizer=tokenizer.name)
    torch.manual_seed(seed)  # the same seed gives the same initial weights
    return GPT(config), tokenizer


def run(args: argparse.Namespace) -> None:
    from pocketlm.train import train

    cfg = config_from_args(args, model=args.model, method="pretrain")
    cfg.validate()
    model, tokenizer = build_model(cfg.model, cfg.data, cfg.seed, args.pad_vocab)
    print(f"model {cfg.model}: {model.num_parameters():,} parameters; data {cfg.data}; run {cfg.out}")
    summary = train(model, tokenizer, cfg)
    print(json.dumps({k: summary[k] for k in ("steps", "best_val_loss", "final_train_loss", "tokens_per_s",
                                              "wall_s")}))
