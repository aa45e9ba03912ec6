"""`pocketlm export SOURCE --out DIR`: any model source as a Hugging Face folder (or a GGUF file).

SOURCE is a built-in base (smollm2-135m), a model folder, a run directory (its best checkpoint; a LoRA
run's adapter is merged into its base), a .gguf file or a cached Hub id. The folder holds config.json, model.safetensors and tokenizer files, which
transformers' AutoModelForCausalLM and AutoTokenizer load directly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pocketlm.cli.common import HelpFormatter
from pocketlm.errors import UserError

DTYPES = ("fp32", "bf16", "fp16")
GGUF_EXPORT_TYPES = ("fp32", "fp16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # see gguf_export


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
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="output format")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def export(source: str, out: str | Path, dtype: str = "fp32", fmt: str = "hf", overwrite: bool = False) -> Path:
    out = Path(out)
    if fmt == "hf" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is only for --format gguf: choose one of {', '.join(DTYPES)}")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out} already exists: choose another --out, or pass --overwrite to replace it")
    from pocketlm.atomic import check_output_dir, check_output_file

    if fmt == "gguf":
        check_output_file(out, "--out")
    else:
        check_output_dir(out, "--out")
    import torch

    from pocketlm import checkpoint

    model, tokenizer = checkpoint.load_model(source, device="cpu")
    metadata = {"exported_from": str(source), "dtype": dtype}
    from pocketlm.compress.convert import dequantize_model, is_quantized

    if is_quantized(model):  # a `pocketlm quantize` folder: GGUF gets its own codes, HF the float weights
        if fmt == "gguf":
            from pocketlm.compress.gguf import export_quantized_gguf

            export_quantized_gguf(model, tokenizer, out, dtype)
            return out
        model = dequantize_model(model)
        metadata["dequantized_from"] = "pocketlm quantize folder"
    if any("lora_" in name for name, _ in model.named_parameters()):
        from pocketlm import lora  # a LoRA run: export the base with the adapter folded in

        model = lora.merge_lora(model)
        metadata["merged_adapter"] = True
    if fmt == "gguf":
        from pocketlm.gguf_export import write_gguf

        write_gguf(model, tokenizer, out, dtype=dtype)
        return out
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    checkpoint.save_model(model, tokenizer, out, metadata=metadata)
    return out


def run(args: argparse.Namespace) -> None:
    out = export(args.source, args.out, dtype=args.dtype, fmt=args.format, overwrite=args.overwrite)
    print(f"exported {args.source} to {out} ({args.format}, {args.dtype})")
