"""`pocketlm finetune --base NAME_OR_PATH --data DIR --method full|lora|qlora`: adapt a pretrained model.

Flags map onto a TrainConfig (recipe, then flags; --rank/--alpha/--targets/--lora-dropout onto its
`adapter:`) and one call: pocketlm.finetune.finetune(cfg, lr_search=..., lr_search_steps=...).
"""

from __future__ import annotations

import argparse
import json

from pocketlm.cli.common import HelpFormatter
from pocketlm.errors import UserError
from pocketlm.names import CLASSIFY_METHODS, METHODS, QAT_FORMATS
from pocketlm.recipe import add_adapter_arguments, add_train_arguments, config_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a pretrained base (full, LoRA or QLoRA)",
        description="Fine-tune a base model on a prepared data set (or, with --task classify, train a "
                    "classifier on a labelled CSV/TSV/JSONL file) through the same training loop as "
                    "pretraining. BASE: a built-in base (smollm2-135m), a model folder, a run directory, a "
                    ".gguf file or a Hub id in the Hugging Face cache. Flags override the --config recipe.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--base", help="the model to start from (default: the recipe's `model`)")
    p.add_argument("--method", choices=CLASSIFY_METHODS, default=None,
                   help="full fine-tuning, LoRA or QLoRA; head (classify only: the base frozen) (default: the "
                        "recipe's, else full)")
    p.add_argument("--task", choices=("lm", "classify"), default="lm",
                   help="lm: next-token prediction on a prepared data set; classify: a classification head on "
                        "labelled rows (--data FILE, see docs/classification.md)")
    cls = p.add_argument_group("classification (--task classify)")
    cls.add_argument("--text-column", default="text", help="column of the text")
    cls.add_argument("--text-pair-column", default=None, help="column of a second text (pairs, e.g. paraphrase)")
    cls.add_argument("--label-column", default="label", help="column of the label (integers or strings)")
    cls.add_argument("--swap-pairs", action="store_true",
                     help="also train on every pair in the other order (for symmetric tasks such as paraphrase: "
                          "twice the training rows)")
    cls.add_argument("--val-data", default=None, metavar="FILE",
                     help="validation file; without it --data is split with --seed into train/val/test (RUN/splits/)")
    cls.add_argument("--val-fraction", type=float, default=0.1, help="validation share of that split")
    cls.add_argument("--test-fraction", type=float, default=0.1, help="test share of that split")
    cls.add_argument("--max-length", type=int, default=256, help="tokens per row; longer texts are cut and counted")
    cls.add_argument("--batch-size", type=int, default=16, help="rows per optimizer step (micro-batches of --micro-batch)")
    add_adapter_arguments(p)
    search = p.add_argument_group("learning-rate search")
    search.add_argument("--lr-search", metavar="LR,LR,...", default=None,
                        help="try these learning rates in short runs first and keep the best (e.g. 1e-4,3e-4,1e-3)")
    search.add_argument("--lr-search-steps", type=int, default=50, metavar="N", help="steps of each short run")
    qat = p.add_argument_group("quantization-aware training (full fine-tuning and LoRA)")
    qat.add_argument("--qat", choices=QAT_FORMATS, default=None,
                     help="train through fake quantization to this format; then `pocketlm quantize RUN --format F`")
    qat.add_argument("--qat-group-size", type=int, choices=(32, 64, 128), default=32,
                     help="int8/int4 group size")
    qat.add_argument("--qat-scheme", choices=("sym", "asym"), default="sym", help="int4 scheme")
    qat.add_argument("--qat-start-step", type=int, default=0, metavar="N",
                     help="train in float for N steps, then with fake quantization")
    add_train_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm.finetune import finetune, parse_lr_list

    if not args.base and not args.config:
        raise UserError("no base model: pass --base NAME_OR_PATH (e.g. smollm2-135m, a model folder or a .gguf file)")
    cfg = config_from_args(args, model=args.base)
    if args.task == "classify":
        return _classify(args, cfg)
    if args.method == "head":
        raise UserError("--method head trains a classifier's head on a frozen base: add --task classify")
    cfg.method = args.method or (cfg.method if cfg.method in METHODS else "full")
    qat = None
    if args.qat is not None:
        from pocketlm.compress.qat import QATOptions

        qat = QATOptions(format=args.qat, group_size=args.qat_group_size, scheme=args.qat_scheme,
                         start_step=args.qat_start_step)
        qat.validate(cfg.method, cfg.adapter.dropout)
    summary = finetune(cfg, lr_search=parse_lr_list(args.lr_search), lr_search_steps=args.lr_search_steps,
                       qat=qat)
    keys = ("method", "steps", "best_val_loss", "final_train_loss", "tokens_per_s", "wall_s")
    print(json.dumps({k: summary.get(k) for k in keys} | ({"lr": summary["lr_search"]["best_lr"]}
                                                           if "lr_search" in summary else {})))


def _classify(args: argparse.Namespace, cfg) -> None:
    """`finetune --task classify`: pocketlm.classify.finetune.finetune_classifier(cfg, options)."""
    from pocketlm.classify.finetune import ClassifyOptions, finetune_classifier

    if args.qat is not None or args.lr_search:
        raise UserError("--qat and --lr-search are for --task lm: train the classifier without them")
    if not cfg.data:
        raise UserError("no training data: pass --data FILE (a labelled CSV, TSV or JSONL file)")
    cfg.method = args.method or (cfg.method if cfg.method in CLASSIFY_METHODS else "full")
    opts = ClassifyOptions(text_column=args.text_column, label_column=args.label_column,
                           text_pair_column=args.text_pair_column, val_data=args.val_data,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           max_length=args.max_length, batch_size=args.batch_size, swap_pairs=args.swap_pairs)
    summary = finetune_classifier(cfg, opts)
    keys = ("method", "steps", "best_val_accuracy", "best_step", "test_accuracy", "trainable_params",
            "final_train_loss", "wall_s")
    print(json.dumps({k: summary.get(k) for k in keys if k in summary}))
