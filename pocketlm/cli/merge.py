"""`pocketlm merge RUN_OR_ADAPTER --out DIR [--base B]`: fold a LoRA/QLoRA adapter into its base model.

The result is a standalone model folder (a Hugging Face folder: transformers loads it) computing what
base + adapter computed; a QLoRA base is dequantized from NF4 first, so the merged model reproduces the
model the adapter was trained against.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pocketlm.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold a LoRA/QLoRA adapter into its base and write a standalone model folder",
        description="Fold a LoRA or QLoRA adapter into its base model and write a model folder that "
                    "pocketlm and Hugging Face transformers load without PEFT.",
    )
    p.add_argument("source", metavar="RUN_OR_ADAPTER",
                   help="a LoRA/QLoRA run directory (its best, else latest checkpoint), a checkpoint step "
                        "folder, or an adapter folder (adapter_config.json + adapter_model.safetensors, "
                        "pocketlm's or PEFT's)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--base", default=None,
                   help="base model (folder, run or built-in name); default: the adapter's "
                        "base_model_name_or_path")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm import lora
    from pocketlm.io import load_model, peft, save_model

    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UserError(f"{out} already exists and is not empty: choose another --out or pass --force")
    from pocketlm.atomic import check_output_dir

    check_output_dir(out, "--out")
    folder = peft.find_adapter_folder(args.source)
    if peft.read_adapter_config(folder).get("modules_to_save"):  # a LoRA classifier: head + merged base
        from pocketlm.classify.io import merge_classifier

        info = merge_classifier(folder, out, base=args.base)
        print(f"merged LoRA classifier {folder} ({info.num_labels} classes) -> {out} "
              "(AutoModelForSequenceClassification loads it)")
        return
    model, tokenizer = load_model(args.base or peft.adapter_base(folder), adapter=folder)
    meta = dict(getattr(model, "_pocketlm_lora", {}))
    base = args.base or meta.get("base")
    layers = len(lora.lora_modules(model))
    lora.merge_lora(model)
    save_model(model, tokenizer, out, metadata={
        "merged": {"adapter": str(folder.resolve()), "base": base, "method": meta.get("method", "lora"),
                   "layers": layers},
    })
    print(f"merged {meta.get('method', 'lora')} adapter {folder} ({layers} layers) into base {base} -> {out}")
