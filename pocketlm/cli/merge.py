"""`pocketlm merge RUN_OR_ADAPTER --out DIR [--base B]`: fold a LoRA/QLoRA adapter into its base model.

The result is a standalone model folder (a Hugging Face folder: transformers loads it) computing what
base + adapter computed; a QLoRA base is dequantized from NF4 first, so the merged model reproduces the
model the adapter was trained against. The library call: pocketlm.merge (pocketlm.io.export.merge).
"""

from __future__ import annotations

import argparse


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
    from pocketlm.io.export import merge

    r = merge(args.source, args.out, base=args.base, force=args.force)
    if r["kind"] == "classifier":
        print(f"merged LoRA classifier {r['adapter']} ({r['num_labels']} classes) -> {r['out']} "
              "(AutoModelForSequenceClassification loads it)")
    else:
        print(f"merged {r['method']} adapter {r['adapter']} ({r['layers']} layers) into base {r['base']} -> {r['out']}")
