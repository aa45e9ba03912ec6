"""`pocketlm export SOURCE --out DIR`: any model source as a Hugging Face folder (or a GGUF file).

SOURCE is a built-in base (smollm2-135m), a model folder, a run directory (its best checkpoint; a LoRA
run's adapter is merged into its base), a .gguf file or a cached Hub id. The folder holds config.json, model.safetensors and tokenizer files, which
transformers' AutoModelForCausalLM and AutoTokenizer load directly. The library call: pocketlm.io.export.export.
"""

from __future__ import annotations

import argparse

from pocketlm.cli.common import HelpFormatter
from pocketlm.names import EXPORT_FORMATS, GGUF_EXPORT_TYPES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a model as a Hugging Face folder (or GGUF file)",
        description="Export a built-in base, model folder, run directory, .gguf file or cached Hub id as a "
                    "Hugging Face folder that transformers loads, or as a GGUF file for llama.cpp.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", help="built-in base, model folder, run directory, .gguf file or cached Hub id")
    p.add_argument("--out", required=True, help="output folder (hf) or .gguf file (gguf)")
    p.add_argument("--dtype", choices=GGUF_EXPORT_TYPES, default="fp32",
                   help="weight type; the quantized ones (q8_0, q4_0, ...) only with --format gguf")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="hf", help="output format")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm.io.export import export

    out = export(args.source, args.out, dtype=args.dtype, fmt=args.format, overwrite=args.overwrite)
    print(f"exported {args.source} to {out} ({args.format}, {args.dtype})")
