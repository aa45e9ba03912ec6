"""`pocketlm finetune --base NAME_OR_PATH --data DIR --method full|lora|qlora`: adapt a pretrained model.

Flags map onto a TrainConfig (recipe, then flags; --rank/--alpha/--targets/--lora-dropout onto its
`adapter:`) and one call: pocketlm.finetune.finetune(cfg, lr_search=..., lr_search_steps=...).
"""

from __future__ import annotations

import argparse
import json

from pocketlm.cli.common import HelpFormatter
from pocketlm.errors import UserError
from pocketlm.names import METHODS
from pocketlm.recipe import add_adapter_arguments, add_train_arguments, config_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a pretrained base (full, LoRA or QLoRA)",
        description="Fine-tune a base model on a prepared data set through the same training loop as "
                    "pretraining. BASE: a built-in base (smollm2-135m), a model folder, a run directory, a "
                    ".gguf file or a Hub id in the Hugging Face cache. Flags override the --config recipe.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--base", help="the model to start from (default: the recipe's `model`)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="full fine-tuning, LoRA or QLoRA (default: the recipe's, else full)")
    add_adapter_arguments(p)
    search = p.add_argument_group("learning-rate search")
    search.add_argument("--lr-search", metavar="LR,LR,...", default=None,
                        help="try these learning rates in short runs first and keep the best (e.g. 1e-4,3e-4,1e-3)")
    search.add_argument("--lr-search-steps", type=int, default=50, metavar="N", help="steps of each short run")
    qat = p.add_argument_group("quantization-aware training (full fine-tuning)")
    qat.add_argument("--qat", choices=("int8", "int4", "fp8"), default=None,
                     help="train through fake quantization to this format; then `pocketlm quantize RUN --format F`")
    qat.add_argument("--qat-group-size", type=int, choices=(32, 64, 128), default=32, help="int4 group size")
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
    cfg.method = args.method or (cfg.method if cfg.method in METHODS else "full")
    qat = None
    if args.qat is not None:
        from pocketlm.compress.qat import QATOptions

        qat = QATOptions(format=args.qat, group_size=args.qat_group_size, scheme=args.qat_scheme,
                         start_step=args.qat_start_step)
        qat.validate(cfg.method)
    summary = finetune(cfg, lr_search=parse_lr_list(args.lr_search), lr_search_steps=args.lr_search_steps,
                       qat=qat)
    keys = ("method", "steps", "best_val_loss", "final_train_loss", "tokens_per_s", "wall_s")
    print(json.dumps({k: summary.get(k) for k in keys} | ({"lr": summary["lr_search"]["best_lr"]}
                                                           if "lr_search" in summary else {})))
