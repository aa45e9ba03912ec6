"""`quantize(source, format, out)`: the library call behind `pocketlm quantize`.

SOURCE is anything `generate` accepts. A quantized folder as the source is dequantized first, and may only
go to the same or a lower precision; a QAT run's checkpoint (pocketlm.compress.qat) supplies the group
size and scheme its training used, so the folder holds exactly the weights the training saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pocketlm.compress import folder as qfolder
from pocketlm.compress import formats as fm
from pocketlm.compress.convert import dequantize_model, is_quantized, quantize_model
from pocketlm.errors import UserError
from pocketlm.io import load_model, save_model
from pocketlm.io.sources import resolve_model_dir


def source_format(source: str | Path) -> str | None:
    """The format a `pocketlm quantize` folder holds (None for anything else)."""
    path = Path(str(source)).expanduser()
    if not path.is_dir():
        return None
    return (qfolder.read_info(path).get("quantization") or {}).get("format")


def qat_record(source: str | Path) -> dict | None:
    """The fake quantization a QAT run trained with (its checkpoint's qat.json), or None."""
    path = Path(str(source)).expanduser()
    if not path.exists() or path.is_file():
        return None
    step = resolve_model_dir(path)
    qat = step / "qat.json"
    return json.loads(qat.read_text()) if qat.is_file() else None


def check_out(out: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    out = Path(out)
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out} already exists: choose another --out, or pass --overwrite to replace it")
    if out.is_file():
        raise UserError(f"--out {out} is a file: give a folder path")
    if source is not None and Path(str(source)).expanduser().resolve() == out.resolve():
        raise UserError("--out is the source folder: write the quantized model to another folder")
    return out


def make_spec(fmt: str, group_size: int | None, scheme: str | None, skip, qat: dict | None) -> fm.QuantSpec:
    """The spec, with a QAT run's own group size and scheme where the user did not choose them."""
    from_qat = qat if qat and qat.get("format") == fmt else {}
    spec = fm.QuantSpec(format=fmt, group_size=group_size or from_qat.get("group_size", 32),
                        scheme=scheme or from_qat.get("scheme", "sym"), skip=fm.parse_skip(skip))
    spec.validate()
    if from_qat and (spec.group_size, spec.scheme) != (from_qat.get("group_size"), from_qat.get("scheme")):
        print(f"pocketlm quantize: note: the run trained with {fmt} group {from_qat['group_size']} "
              f"{from_qat['scheme']}; these weights differ from what it saw", file=sys.stderr)
    return spec


def load_float_model(source: str | Path):
    """Any source as a float32 model (quantized folders dequantized, LoRA adapters merged) + tokenizer."""
    model, tokenizer = load_model(str(source), device="cpu")
    if is_quantized(model):
        model = dequantize_model(model)
    if any("lora_" in name for name, _ in model.named_parameters()):
        from pocketlm import lora

        model = lora.merge_lora(model)
    return model.float().eval(), tokenizer


def quantize(source: str | Path, fmt: str, out: str | Path, *, group_size: int | None = None,
             scheme: str | None = None, skip: str | list[str] | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Write SOURCE in format `fmt` to the folder `out`; returns the record with sizes on disk."""
    if fmt not in fm.FORMATS:
        raise UserError(f"unknown format {fmt!r}: choose one of {', '.join(fm.FORMATS)}")
    out = check_out(out, overwrite, source)
    have = source_format(source)
    if have is not None and fm.BITS[fmt] > fm.BITS[have]:
        raise UserError(f"{source} is already {have}: quantizing it to {fmt} cannot bring back the precision it "
                        f"lost; quantize the original model instead (or choose {have} or fewer bits)")
    qat = qat_record(source)
    spec = make_spec(fmt, group_size, scheme, skip, qat)
    model, tokenizer = load_float_model(source)
    params = {id(p): p for p in model.parameters()}
    fp32_weight_bytes = 4 * sum(p.numel() for p in params.values())
    record = quantize_model(model, spec, progress=progress)
    meta = {"source": str(source), **({"qat": qat} if qat else {})}
    if spec.format in fm.FLOAT_FORMATS:
        save_model(model, tokenizer, out, metadata={"quantization": record, **meta})
        weights = out / "model.safetensors"
    else:
        qfolder.write_quantized(model, tokenizer, out, record, metadata=meta)
        weights = out / qfolder.WEIGHTS
    size = qfolder.folder_bytes(out)
    fp32_bytes = size - weights.stat().st_size + fp32_weight_bytes  # the same folder with fp32 weights
    return {"out": str(out), "format": spec.format, "size_bytes": size, "fp32_bytes": fp32_bytes,
            "ratio_to_fp32": size / fp32_bytes, "quantization": {k: v for k, v in record.items() if k != "layers"},
            "quantized_layers": len(record["layers"])}


def describe(result: dict) -> str:
    q = result["quantization"]
    detail = f" (group {q['group_size']}, {q['scheme']})" if q["format"] == "int4" else ""
    return (f"wrote {result['out']}: {q['format']}{detail}, {result['size_bytes'] / 1e6:.1f} MB on disk, "
            f"{result['ratio_to_fp32']:.3f}x the fp32 folder ({result['fp32_bytes'] / 1e6:.1f} MB)")


def load(source: str | Path, device: str | torch.device = "cpu"):
    """Any model source, quantized folders on their kernels (a notebook's one call)."""
    return load_model(str(source), device=device)
