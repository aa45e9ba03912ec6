"""LoRA and QLoRA: low-rank adapters on frozen linear layers, their targets, and merging.

A target nn.Linear becomes `LoraLinear(base_layer)`: y = base(x) + scaling * B(A(dropout(x))), with
A (rank, in) initialised as PEFT does (Kaiming-uniform), B (out, rank) zero, scaling = alpha / rank
(alpha / sqrt(rank) for rsLoRA adapters made by PEFT). Only A and B require grad, so the training loop
(which optimizes params with requires_grad) keeps optimizer state for them alone. QLoRA holds every
linear weight of the blocks in NF4 (pocketlm.quant) and keeps A and B in full precision.

The forward and backward of a LoRA layer are one autograd Function (quant.frozen_linear_lora): the
frozen base weight is neither saved for backward nor differentiated (under bf16 autocast a plain F.linear
would keep a bf16 copy of it per layer; under QLoRA the dequantized weight), it is cast or dequantized
again in backward, and the layer input is saved once by reference, not as one cast copy per consumer.

Adapter folders (PEFT's format: saving, loading, the LoraSaver of LoRA runs) are pocketlm.io.peft.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.compress.modules import QUANT_LINEARS  # int8/int4/fp8 bases (pocketlm quantize folders)
from pocketlm.errors import UserError
from pocketlm.io import hf
from pocketlm.model import MLP, CausalSelfAttention
from pocketlm.names import ADAPTER_METHODS, TARGET_MODULES, TARGET_PRESETS
from pocketlm.quant import BLOCK_SIZE, NF4Linear, _compute_dtype, frozen_linear_lora, shared_input_lora

METHODS = ADAPTER_METHODS
PRESETS = TARGET_MODULES
PRESET_NAMES = TARGET_PRESETS


# -- the layer --------------------------------------------------------------------------------------
class LoraLinear(nn.Module):
    """A frozen linear layer (nn.Linear or NF4Linear) plus a trainable low-rank update."""

    takes_swiglu_gate = True  # MLP.forward may pass the SwiGLU gate instead of the product

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha, self.dropout, self.use_rslora = rank, alpha, dropout, use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        device = base_layer.weight.device if isinstance(base_layer, nn.Linear) else next(base_layer.buffers()).device
        # Adapters are float32 whatever the base holds: they are what the optimizer updates.
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default; B = 0 keeps the base output

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on x, or on silu(gate) * x (a SwiGLU down projection, recomputed in backward)."""
        if gate is not None and self.training and self.dropout > 0:  # dropout needs the product itself
            x, gate = F.silu(gate) * x, None
        xd = F.dropout(x, self.dropout, training=True) if self.training and self.dropout > 0 else None
        weight, absmax = self.frozen_weight(_compute_dtype(x))
        return frozen_linear_lora(x, xd, weight, absmax, self.base_layer.bias, self.lora_A, self.lora_B,
                                  self.scaling, _compute_dtype(x), gate=gate)

    def frozen_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, absmax) of the frozen base: a float weight (absmax None), NF4 codes, or an int8/int4/fp8
        base's weight dequantized to dtype for this call."""
        base = self.base_layer
        if isinstance(base, NF4Linear):
            return base.weight_packed, base.weight_absmax
        if isinstance(base, QUANT_LINEARS):
            return base.dequantized_weight(dtype), None
        return base.weight, None

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in float32: what merging adds to the base weight."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear computing the same function (an NF4 base is dequantized first), in `dtype`
        (default: the base weight's)."""
        base = self.base_layer
        linear = base.dequantize() if isinstance(base, (NF4Linear, *QUANT_LINEARS)) else base
        weight = linear.weight.float() + self.delta_weight()
        linear.to(dtype=dtype or linear.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, scaling={self.scaling:g}"


# Projections that read the same input (Llama's q/k/v, gate/up) can run as one matmul while training:
# fewer, larger GEMMs and one input gradient (quant.shared_input_lora). Off by default: on the 2-core
# AVX512-BF16 CPU it was measured on, the LoRA step of smollm2-135m ran 0.90x as fast (bf16; fp32 0.95x)
# with 1.06x the peak memory (benchmarks/bench_lora.py, variant pocketlm-lora-shared). Kept, tested equal,
# for machines where larger GEMMs pay (measure there first).
SHARE_INPUT_MATMULS = False


def project_together(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor] | None:
    """The outputs of `layers` on their common input x through one fused matmul, or None when they cannot
    share it (then each layer runs alone). They share it while gradients are on and the layers are in
    training mode, when all are exact LoraLinear layers without active dropout (a QAT subclass computes its
    own weight) or all are frozen plain nn.Linear layers (a LoRA run's untargeted base). At inference a
    fused call would copy the weights for every token, so it is never taken there."""
    if not (SHARE_INPUT_MATMULS and torch.is_grad_enabled() and layers[0].training):
        return None
    dtype = _compute_dtype(x)
    if all(type(m) is LoraLinear and m.dropout == 0 for m in layers):
        frozen = [(*m.frozen_weight(dtype), (m.out_features, m.in_features), m.base_layer.bias) for m in layers]
        adapters = [m.lora_A for m in layers] + [m.lora_B for m in layers]
        y = shared_input_lora(x, frozen, [m.scaling for m in layers], dtype, adapters)
    elif all(type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters()) for m in layers):
        frozen = [(m.weight, None, (m.out_features, m.in_features), m.bias) for m in layers]
        y = shared_input_lora(x, frozen, [], dtype)
    else:
        return None
    return list(y.split([m.out_features for m in layers], dim=-1))


# -- targets ----------------------------------------------------------------------------------------
def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside the transformer blocks (not lm_head), by pocketlm module path."""
    out = {}
    for name, module in model.named_modules():
        if name.startswith("transformer.h.") and isinstance(module, (nn.Linear, NF4Linear, *QUANT_LINEARS,
                                                                      LoraLinear)):
            if ".base_layer" not in name:
                out[name] = module
    return out


def _valid_names(names: list[str]) -> list[str]:
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    pairs = {".".join(n.split(".")[-2:]) for n in names}
    return sorted(leaves) + sorted(pairs - leaves)


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Module paths named by presets (attn, attn+mlp, all-linear) or by names/suffixes, PEFT-style."""
    family = model.config.family
    candidates = list(block_linears(model))
    items = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not items:
        raise UserError(f"no LoRA targets given: use one of {', '.join(PRESET_NAMES)} or module names "
                        f"({', '.join(_valid_names(candidates))})")
    chosen: set[str] = set()
    for item in items:
        if item == "all-linear":
            chosen.update(candidates)
            continue
        suffixes = PRESETS[family].get(item, [item])
        matched = [n for n in candidates for s in suffixes
                   if n == s or n.endswith("." + s) or (h := hf.to_hf_name(n, family)) == s or h.endswith("." + s)]
        if not matched:
            raise UserError(f"LoRA target {item!r} matches no linear layer of this {family} model: valid names "
                            f"are {', '.join(_valid_names(candidates))}, or a preset ({', '.join(PRESET_NAMES)})")
        chosen.update(matched)
    return [n for n in candidates if n in chosen]  # model order


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _wrap(model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float, quantize: bool,
          use_rslora: bool = False) -> None:
    if lora_modules(model):  # checked before anything changes
        raise UserError("the model already has LoRA layers: merge them first (pocketlm merge)")
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = set(names)
    for name, module in block_linears(model).items():
        if quantize and isinstance(module, nn.Linear):
            module = NF4Linear.from_linear(module)  # QLoRA: every block linear in NF4, targets or not
            _set_module(model, name, module)
        if name in wanted:
            _set_module(model, name, LoraLinear(module, rank, alpha, dropout, use_rslora))
    for module in model.modules():
        if isinstance(module, (CausalSelfAttention, MLP)):
            module.project_together = project_together


def _check_hparams(method: str, rank: int, alpha: float, dropout: float) -> None:
    if method not in METHODS:
        raise UserError(f"unknown adapter method {method!r}: use lora or qlora")
    if not isinstance(rank, int) or rank <= 0:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}: try --rank 8")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha!r}: try --alpha 16 (twice the rank)")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def prepare_model(model: nn.Module, method: str, rank: int, alpha: float, dropout: float,
                  targets: str | list[str], base: str | None = None) -> dict:
    """Wrap the target linears with LoRA (QLoRA: NF4 base), freeze the rest, print and return counts.

    The share is trainable / all parameters of the wrapped model (base + adapter), as PEFT's
    print_trainable_parameters reports it: GPT-2 124M, rank 8 on c_attn gives 294,912 of 124,734,720
    (0.2364%). QLoRA counts the base's parameters as they were before quantization.
    `base` (the base model's name or folder) is recorded for the adapter's base_model_name_or_path.
    """
    _check_hparams(method, rank, alpha, dropout)
    names = resolve_targets(model, targets)
    base_params = model.num_parameters() if hasattr(model, "num_parameters") else \
        sum(p.numel() for p in model.parameters())
    _wrap(model, names, rank, alpha, dropout, quantize=method == "qlora")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = base_params + trainable
    model._pocketlm_lora = {"method": method, "base": _base_ref(base), "targets": names}
    info = {
        "method": method, "rank": rank, "alpha": alpha, "dropout": dropout, "targets": names,
        "target_modules": peft_target_modules(model, names), "trainable_params": trainable,
        "base_params": base_params, "total_params": total, "trainable_share": trainable / total,
    }
    if method == "qlora":
        info["nf4_block_size"] = BLOCK_SIZE
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.4%})")
    return info


def _base_ref(base: str | Path | None) -> str | None:
    """An existing folder or file as an absolute path (loadable from anywhere); names as given."""
    if base is None:
        return None
    path = Path(str(base)).expanduser()
    return str(path.resolve()) if path.exists() else str(base)


# -- merge ------------------------------------------------------------------------------------------
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap; NF4 bases are dequantized. In place.

    Merged layers take the dtype of the token embedding (the model's dtype), whatever their base held.
    """
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    dtype = wte.weight.dtype if wte is not None else None
    for name, module in list(block_linears(model).items()):
        if isinstance(module, LoraLinear):
            _set_module(model, name, module.merged(dtype))
        elif isinstance(module, (NF4Linear, *QUANT_LINEARS)):
            _set_module(model, name, module.dequantize().to(dtype=dtype or torch.float32))
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "_pocketlm_lora"):
        del model._pocketlm_lora
    return model


# -- PEFT names -------------------------------------------------------------------------------------
def _matches_list(hf_name: str, patterns: list[str]) -> bool:
    return any(hf_name == p or hf_name.endswith("." + p) for p in patterns)


def peft_target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT's target_modules selecting exactly `names`: leaf names, else parent.leaf, else a regex."""
    family = model.config.family
    all_hf = [hf.to_hf_name(n, family) for n in block_linears(model)]
    chosen = [hf.to_hf_name(n, family) for n in names]
    for depth in (1, 2):
        patterns = sorted({".".join(h.split(".")[-depth:]) for h in chosen})
        if {h for h in all_hf if _matches_list(h, patterns)} == set(chosen):
            return patterns
    return "^(?:" + "|".join(re.escape(h) for h in chosen) + ")$"
