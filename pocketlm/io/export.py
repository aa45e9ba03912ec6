"""Export: any model source as a Hugging Face folder that transformers loads, or a GGUF file for llama.cpp."""

from __future__ import annotations

from pathlib import Path

from pocketlm.atomic import check_output_dir, check_output_file
from pocketlm.compress.convert import dequantize_model, is_quantized
from pocketlm.compress.gguf import export_quantized_gguf
from pocketlm.device import precision_dtype
from pocketlm.errors import UserError
from pocketlm.io.folders import save_model
from pocketlm.io.gguf_write import write_gguf
from pocketlm.io.sources import load_model
from pocketlm.lora import merge_lora

DTYPES = ("fp32", "bf16", "fp16")  # a Hugging Face folder's weight types; GGUF adds quantized ones


def export(source: str | Path, out: str | Path, dtype: str = "fp32", fmt: str = "hf", overwrite: bool = False) -> Path:
    """Any model source as a Hugging Face folder (`fmt="hf"`, dtype fp32/bf16/fp16) or a GGUF file
    (`fmt="gguf"`, also q8_0, q4_0, ...); a LoRA run's adapter is folded into its base first."""
    out = Path(out)
    if fmt == "hf" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is only for --format gguf: choose one of {', '.join(DTYPES)}")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out} already exists: choose another --out, or pass --overwrite to replace it")
    if fmt == "gguf":
        check_output_file(out, "--out")
    else:
        check_output_dir(out, "--out")
    model, tokenizer = load_model(source, device="cpu")
    metadata = {"exported_from": str(source), "dtype": dtype}
    if is_quantized(model):  # a `pocketlm quantize` folder: GGUF gets its own codes, HF the float weights
        if fmt == "gguf":
            export_quantized_gguf(model, tokenizer, out, dtype)
            return out
        model = dequantize_model(model)
        metadata["dequantized_from"] = "pocketlm quantize folder"
    if any("lora_" in name for name, _ in model.named_parameters()):
        model = merge_lora(model)  # a LoRA run: export the base with the adapter folded in
        metadata["merged_adapter"] = True
    if fmt == "gguf":
        write_gguf(model, tokenizer, out, dtype=dtype)
        return out
    model = model.to(precision_dtype(dtype))
    save_model(model, tokenizer, out, metadata=metadata)
    return out


def merge(source: str | Path, out: str | Path, *, base: str | None = None, force: bool = False) -> dict:
    """`pocketlm merge`: fold a LoRA/QLoRA adapter (a run, a checkpoint step folder or an adapter folder) into
    its base (`base`, else the one its adapter_config names) and write a standalone model folder at `out`
    (a LoRA classifier becomes a classifier folder). Returns what was merged: `kind` ("lm" or
    "classifier"), `adapter`, `base`, `method`, `layers` (lm) or `num_labels` (classifier), `out`."""
    from pocketlm import lora
    from pocketlm.io import peft

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} already exists and is not empty: choose another --out or pass --force")
    check_output_dir(out, "--out")
    folder = peft.find_adapter_folder(source)
    if peft.read_adapter_config(folder).get("modules_to_save"):  # a LoRA classifier: head + merged base
        from pocketlm.classify.io import merge_classifier

        info = merge_classifier(folder, out, base=base)
        return {"kind": "classifier", "adapter": folder, "num_labels": info.num_labels, "out": out}
    model, tokenizer = load_model(base or peft.adapter_base(folder), adapter=folder)
    meta = dict(getattr(model, "_pocketlm_lora", {}))
    base = base or meta.get("base")
    method = meta.get("method", "lora")
    layers = len(lora.lora_modules(model))
    merge_lora(model)
    save_model(model, tokenizer, out, metadata={
        "merged": {"adapter": str(folder.resolve()), "base": base, "method": method, "layers": layers},
    })
    return {"kind": "lm", "adapter": folder, "base": base, "method": method, "layers": layers, "out": out}
