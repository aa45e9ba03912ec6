"""Quantized model folders on disk (`pocketlm.quantized.v1`): write, recognise, load.

A folder holds
- `config.json`: the Hugging Face config with pocketlm's config under "pocketlm" (as a model folder);
- `model.quantized.safetensors`: pocketlm module names (not Hugging Face's: no transformers loader reads
  these codes, and the other file name keeps transformers from half-loading the folder). For a quantized
  layer NAME: `NAME.qweight` (int8 [N, K] for int8; uint8 [N, K/2] for int4, two codes a byte, column 2j in
  the low nibble; uint8 e4m3 bits [N, K] for fp8), `NAME.scales` (bf16, [N] or [N, K/G]), `NAME.zeros`
  (bf16 [N, K/G], int4 asym only), `NAME.bias` (fp32) if any; NF4 layers keep pocketlm.quant's
  `weight_packed` + `weight_absmax`; every other tensor (norms, float layers) in fp32. A tied output head
  is not stored: it shares the embedding's int8 table.
- `pocketlm.json`: `{"format": "pocketlm.quantized.v1", "quantization": {"format", "group_size", "scheme",
  "skip", "layers": {module: kind}, "tied_head"}, "tokenizer", "source", ...}`;
- the tokenizer files.
Float formats (fp64/fp32/fp16/bf16) are ordinary model folders in that dtype whose pocketlm.json records
`"quantization": {"format": ...}`; they load in that dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from pocketlm.atomic import AtomicDir
from pocketlm.compress import formats as fm
from pocketlm.compress.modules import (
    FP8Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    mark_head,
    stack_projections,
)
from pocketlm.errors import UserError
from pocketlm.io import hf
from pocketlm.model import GPT
from pocketlm.quant import NF4Linear
from pocketlm.tokenizer import Tokenizer, load_tokenizer

FORMAT = "pocketlm.quantized.v1"
WEIGHTS = "model.quantized.safetensors"
_PACKED_KEYS = ("qweight", "scales", "zeros")


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / "pocketlm.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_quantized_folder(folder: str | Path) -> bool:
    return Path(folder).is_dir() and read_info(folder).get("format") == FORMAT


def float_format_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype a float-format folder (fp64/fp16/bf16 from `pocketlm quantize`) loads in, else None."""
    fmt = (read_info(folder).get("quantization") or {}).get("format")
    return fm.FLOAT_FORMATS.get(fmt)


def is_float_format_folder(folder: str | Path) -> bool:
    """A folder `pocketlm quantize --format fp16|bf16|fp64` wrote: plain weights, loaded in that dtype."""
    return Path(folder).is_dir() and float_format_dtype(folder) is not None


def load_float_format(folder: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """A float-format folder as a plain model folder, in its recorded dtype unless `dtype` says otherwise."""
    from pocketlm.io.folders import load_plain_folder

    return load_plain_folder(folder, device=device, dtype=dtype or float_format_dtype(folder))


def folder_bytes(folder: str | Path) -> int:
    """Size on disk of a folder's files (or of one file)."""
    path = Path(folder)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def quantized_state(model: GPT, record: dict) -> dict[str, torch.Tensor]:
    """The tensors to save: packed buffers with bf16 scales, fp32 for everything float, tied head dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tied = getattr(model.lm_head, "weight", None) is model.transformer.wte.weight
        if name.startswith("lm_head.") and (record.get("tied_head") or tied):
            continue  # tied: the embedding's table is the head's
        module, _, leaf = name.rpartition(".")
        if module in record["layers"] and leaf in ("scales", "zeros"):
            out[name] = tensor.detach().to(torch.bfloat16).contiguous()  # exact: scales hold bf16 values
        elif tensor.is_floating_point():
            out[name] = tensor.detach().float().contiguous()
        else:
            out[name] = tensor.detach().contiguous()
    return out


def write_quantized(model: GPT, tokenizer: Tokenizer | None, directory: str | Path, record: dict,
                    metadata: dict | None = None) -> Path:
    """Write a quantized model folder atomically (a temporary folder renamed into place)."""
    with AtomicDir(directory) as tmp:
        save_file(quantized_state(model, record), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(hf.to_hf_config(model.config, "float32"), indent=2) + "\n")
        info = {"format": FORMAT, "quantization": record, **(metadata or {})}
        if tokenizer is not None:
            tokenizer.save(tmp)
            info["tokenizer"] = tokenizer.describe()
        (tmp / "pocketlm.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(directory)


def _take(state: dict[str, torch.Tensor], prefix: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: state.pop(f"{prefix}.{k}") for k in keys if f"{prefix}.{k}" in state}


def _build_layer(kind: str, t: dict[str, torch.Tensor], record: dict, meta: nn.Module) -> nn.Module:
    bias = t.get("bias")
    if kind == "int8":
        return Int8Linear(t["qweight"], t["scales"], bias)
    if kind == "int4":
        return Int4Linear(t["qweight"], t["scales"], t.get("zeros"), int(record["group_size"]), bias)
    if kind == "fp8":
        return FP8Linear(t["qweight"], t["scales"], bias)
    if kind == "nf4":
        return NF4Linear(meta.in_features, meta.out_features, t["weight_packed"], t["weight_absmax"], bias)
    raise UserError(f"unknown layer kind {kind!r} in the folder's pocketlm.json: it was written by a newer pocketlm")


def load_quantized(folder: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """A quantized folder as a model whose quantized layers compute on the low-precision kernels.

    `dtype` is the dtype of the float parts (norms, float layers, the residual stream); fp32 by default.
    """
    from pocketlm.compress.convert import set_module

    folder = Path(folder)
    info = read_info(folder)
    record = info.get("quantization") or {}
    if "layers" not in record:
        raise UserError(f"{folder}/pocketlm.json has no quantization record: the folder is damaged; quantize again")
    weights = folder / WEIGHTS
    try:
        # Copies: the kernels use aligned vector loads, and tensors read from a safetensors file sit at
        # whatever offset the file gives them (a segmentation fault in _weight_int8pack_mm otherwise).
        state = {k: v.clone() for k, v in load_file(str(weights)).items()}
    except Exception as exc:  # noqa: BLE001 - any read failure is the file's fault
        raise UserError(f"cannot read {weights}: {exc} (truncated or missing; quantize again)") from exc
    config = hf.from_hf_config(json.loads((folder / "config.json").read_text()), name=folder.name,
                               tokenizer=str(folder))
    tokenizer = load_tokenizer(folder)
    with torch.device("meta"):
        model = GPT(config)
    for name, kind in record["layers"].items():
        if name == "lm_head" and record.get("tied_head"):
            continue
        meta = model.get_submodule(name)
        tensors = _take(state, name, (*_PACKED_KEYS, "bias", "weight_packed", "weight_absmax"))
        if name == "transformer.wte":
            layer = Int8Embedding(tensors["qweight"], tensors["scales"])
        else:
            layer = _build_layer(kind, tensors, record, meta)
        set_module(model, name, layer)
    if record.get("tied_head"):
        table = model.transformer.wte
        model.lm_head = Int8Linear(table.qweight, table.scales)
        model.lm_head.qweight, model.lm_head.scales = table.qweight, table.scales
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and not record.get("tied_head") and "lm_head.weight" in missing:
        model.lm_head.weight = model.transformer.wte.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or still_meta:
        raise UserError(f"{weights} does not fit its config: missing {still_meta[:3]}, unexpected {unexpected[:3]}"
                        " (the folder is damaged; quantize again)")
    model._rope_cache = None
    mark_head(model)
    stack_projections(model)
    model.eval()
    return model.to(device=device, dtype=dtype or torch.float32), tokenizer

