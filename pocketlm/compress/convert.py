"""Model-level transforms: swap float layers for quantized ones (from outside the model), and back.

Which layers: every nn.Linear inside the transformer blocks gets the format; the token embedding and the
output head get int8 for every packed format (a scale per group of 32, as Q8_0: at most ~0.001 bits/byte
on smollm2, while 4-bit tables cost far more quality than the bytes they save), and with tied weights they share one
int8 table. `--skip` keeps layers in float: `embeddings`, `lm_head` (tied: both), or any fragment of a module
name (`mlp`, `h.0.`, `down_proj`). GPT-2's position table and every norm stay float (they are tiny).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm import tqdm

from pocketlm.compress import formats as fm
from pocketlm.compress.modules import (
    QUANT_LINEARS,
    FP8Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    mark_head,
    stack_projections,
)
from pocketlm.errors import UserError
from pocketlm.quant import NF4Linear


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _skipped(name: str, skip: list[str], tied: bool) -> bool:
    head_or_table = name in ("lm_head", "transformer.wte")
    if head_or_table:
        wanted = {"embeddings", "lm_head"} & set(skip) if tied else (
            {"embeddings"} & set(skip) if name == "transformer.wte" else {"lm_head"} & set(skip))
        return bool(wanted)
    return any(s not in ("embeddings", "lm_head") and s in name for s in skip)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith("transformer.h.") and type(m) is nn.Linear}


def plan(model: nn.Module, spec: fm.QuantSpec) -> dict[str, str]:
    """{module name: kind} for every layer the spec quantizes; raises UserError before anything changes."""
    spec.validate()
    tied = bool(getattr(model.config, "tie_embeddings", False))
    unknown = [s for s in spec.skip if s not in ("embeddings", "lm_head")
               and not any(s in n for n, _ in model.named_modules())]
    if unknown:
        raise UserError(f"--skip {','.join(unknown)} matches no layer: use embeddings, lm_head or a fragment of a "
                        "module name such as mlp, attn, h.0. or down_proj")
    layers: dict[str, str] = {}
    for name, linear in block_linears(model).items():
        if _skipped(name, spec.skip, tied):
            continue
        if spec.format in ("int4", "int8"):
            fm.check_group(linear.in_features, spec.group_size, name)
        layers[name] = spec.format
    for name in ("transformer.wte", "lm_head"):
        if isinstance(model.get_submodule(name), (nn.Embedding, nn.Linear)) and not _skipped(name, spec.skip, tied):
            layers[name] = "int8"
    return layers


def _quantized_linear(linear: nn.Linear, kind: str, spec: fm.QuantSpec) -> nn.Module:
    if kind == "int8":
        return Int8Linear.from_linear(linear, spec.group_size)
    if kind == "int4":
        return Int4Linear.from_linear(linear, spec.group_size, spec.scheme)
    if kind == "fp8":
        return FP8Linear.from_linear(linear)
    return NF4Linear.from_linear(linear)


@torch.no_grad()
def quantize_model(model: nn.Module, spec: fm.QuantSpec, progress: bool = True) -> dict:
    """Quantize `model` in place as `spec` says; returns the record a folder keeps (layers, tied head)."""
    if spec.format in fm.FLOAT_FORMATS:
        spec.validate()
        model.to(fm.FLOAT_FORMATS[spec.format])
        return {**spec.to_dict(), "layers": {}, "tied_head": False}
    layers = plan(model, spec)
    tied = bool(model.config.tie_embeddings) and "transformer.wte" in layers and "lm_head" in layers
    for name in tqdm([n for n in layers if n.startswith("transformer.h.")], desc=f"quantize {spec.format}",
                     disable=not progress, leave=False):
        set_module(model, name, _quantized_linear(model.get_submodule(name), layers[name], spec))
    if "transformer.wte" in layers:
        table = Int8Embedding.from_embedding(model.transformer.wte)
        model.transformer.wte = table
        if tied:  # one int8 table for both: the head shares the embedding's codes and scales
            model.lm_head = Int8Linear(table.qweight, table.scales)
            model.lm_head.qweight, model.lm_head.scales = table.qweight, table.scales
    if "lm_head" in layers and not tied:
        model.lm_head = Int8Linear.from_linear(model.lm_head, fm.table_group(model.lm_head.in_features))
    mark_head(model)
    stack_projections(model)
    return {**spec.to_dict(), "layers": layers, "tied_head": tied}


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Every quantized layer back to float32 nn.Linear / nn.Embedding (re-tied where the head shared codes)."""
    tied = isinstance(model.transformer.wte, Int8Embedding) and isinstance(model.lm_head, Int8Linear) and \
        model.lm_head.qweight is model.transformer.wte.qweight
    for name, module in list(model.named_modules()):
        if isinstance(module, (*QUANT_LINEARS, NF4Linear)) and name != "lm_head":
            set_module(model, name, module.dequantize())
    if isinstance(model.transformer.wte, Int8Embedding):
        table = model.transformer.wte
        emb = nn.Embedding(table.num_embeddings, table.embedding_dim, device=table.qweight.device)
        emb.weight.copy_(table.dequantized_weight(torch.float32))
        model.transformer.wte = emb
    if tied:
        model.lm_head = nn.Linear(model.config.n_embd, model.config.embedding_rows, bias=False,
                                  device=model.transformer.wte.weight.device)
        model.lm_head.weight = model.transformer.wte.weight
    elif isinstance(model.lm_head, Int8Linear):
        model.lm_head = model.lm_head.dequantize()
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (*QUANT_LINEARS, NF4Linear, Int8Embedding)) for m in model.modules())
