"""LoRA and QLoRA: low-rank adapters on frozen linear layers, in PEFT's adapter format, and merging.

A target nn.Linear becomes `LoraLinear(base_layer)`: y = base(x) + scaling * B(A(dropout(x))), with
A (rank, in) initialised as PEFT does (Kaiming-uniform), B (out, rank) zero, scaling = alpha / rank
(alpha / sqrt(rank) for rsLoRA adapters made by PEFT). Only A and B require grad, so the training loop
(which optimizes params with requires_grad) keeps optimizer state for them alone. QLoRA holds every
linear weight of the blocks in NF4 (pocketlm.quant) and keeps A and B in full precision.

The forward and backward of a LoRA layer are one autograd Function (quant.frozen_linear_lora): the
frozen base weight is neither saved for backward nor differentiated (under bf16 autocast a plain F.linear
would keep a bf16 copy of it per layer; under QLoRA the dequantized weight), it is cast or dequantized
again in backward, and the layer input is saved once by reference, not as one cast copy per consumer.

Adapter folders are PEFT's: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.<Hugging Face module path>.lora_A.weight` (PEFT drops the adapter name "default" on
save). A/B layouts are nn.Linear's in both; GPT-2's Conv1D base only sets fan_in_fan_out=true. A
pocketlm_adapter.json beside them records what PEFT has no field for (QLoRA's NF4 base).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm import hf
from pocketlm.compress.modules import QUANT_LINEARS  # int8/int4/fp8 bases (pocketlm quantize folders)
from pocketlm.errors import UserError
from pocketlm.quant import BLOCK_SIZE, NF4Linear, _compute_dtype, frozen_linear_lora

METHODS = ("lora", "qlora")
PRESETS = {
    "gpt2": {"attn": ["attn.c_attn"], "attn+mlp": ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]},
    "llama": {
        "attn": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"],
        "attn+mlp": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    },
}
PRESET_NAMES = ("attn", "attn+mlp", "all-linear")
ADAPTER_DIR = "adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "pocketlm_adapter.json"
ADAPTER_FORMAT = "pocketlm.adapter.v1"
_PREFIX = "base_model.model."


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
        base = self.base_layer
        if isinstance(base, NF4Linear):
            weight, absmax = base.weight_packed, base.weight_absmax
        elif isinstance(base, QUANT_LINEARS):  # an int8/int4/fp8 base: its weight, dequantized for this call
            weight, absmax = base.dequantized_weight(_compute_dtype(x)), None
        else:
            weight, absmax = base.weight, None
        return frozen_linear_lora(x, xd, weight, absmax, base.bias, self.lora_A, self.lora_B, self.scaling,
                                  _compute_dtype(x), gate=gate)

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


# -- PEFT format ------------------------------------------------------------------------------------
def _peft_key(model: nn.Module, name: str, which: str) -> str:
    return f"{_PREFIX}{hf.to_hf_name(name, model.config.family)}.{which}.weight"


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


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in lora_modules(model).items():
        state[_peft_key(model, name, "lora_A")] = module.lora_A.detach().to("cpu").contiguous()
        state[_peft_key(model, name, "lora_B")] = module.lora_B.detach().to("cpu").contiguous()
    return state


def adapter_config(model: nn.Module, base: str | None = None) -> dict:
    mods = lora_modules(model)
    if not mods:
        raise UserError("the model has no LoRA layers to save: prepare it with lora.prepare_model first")
    first = next(iter(mods.values()))
    meta = getattr(model, "_pocketlm_lora", {})
    alpha = first.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_ref(base) or meta.get("base"),
        "revision": None,
        "r": first.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": first.dropout,
        "target_modules": peft_target_modules(model, list(mods)),
        "exclude_modules": None,
        "fan_in_fan_out": model.config.family == "gpt2",  # HF GPT-2's Conv1D stores weights (in, out)
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def write_adapter_files(model: nn.Module, folder: Path, base: str | None = None) -> None:
    """Write the adapter into an existing folder (not atomic: callers write into a temporary folder)."""
    from safetensors.torch import save_file

    config = adapter_config(model, base)
    meta = getattr(model, "_pocketlm_lora", {})
    quantized = any(isinstance(m.base_layer, NF4Linear) for m in lora_modules(model).values())
    save_file(adapter_state_dict(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    sidecar = {"format": ADAPTER_FORMAT, "method": "qlora" if quantized else meta.get("method", "lora"),
               "targets": list(lora_modules(model)), "family": model.config.family}
    if quantized:
        sidecar["quantization"] = {"type": "nf4", "block_size": BLOCK_SIZE}
    (folder / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")


def save_adapter(model: nn.Module, folder: str | Path, base: str | None = None) -> Path:
    from pocketlm.checkpoint import AtomicDir

    with AtomicDir(folder) as tmp:
        write_adapter_files(model, tmp, base)
    return Path(folder)


# -- loading ----------------------------------------------------------------------------------------
# adapter_config.json keys that do not change what the adapter computes (or that pocketlm reads).
_READ_KEYS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "init_lora_weights", "runtime_config", "megatron_core", "qalora_group_size",
    "layers_pattern", "ensure_weight_tying", "modules_to_save",
}


def _is_set(value) -> bool:
    return value is not None and value is not False and value != {} and value != [] and value != ""


def read_adapter_config(folder: str | Path) -> dict:
    """adapter_config.json, refusing options that would make pocketlm compute something else than PEFT."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a LoRA adapter folder: {CONFIG_FILE} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object: re-save the adapter")
    peft_type = str(cfg.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise UserError(f"the adapter in {folder} is a {peft_type or 'untyped'} adapter: pocketlm loads LoRA only")
    unsupported = []
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() != "gaussian":  # loftq, pissa, olora, ... change the base
        unsupported.append(f"init_lora_weights={init!r}")
    unsupported += [f"{k}={v!r}" for k, v in cfg.items() if k not in _READ_KEYS and _is_set(v)]
    if unsupported:
        raise UserError(f"the adapter in {folder} uses PEFT options pocketlm does not support: "
                        f"{', '.join(unsupported)} (merge it with PEFT and load the merged model instead)")
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0 or not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        raise UserError(f"{path} has an invalid rank r={r!r} or lora_alpha={cfg.get('lora_alpha')!r}")
    return cfg


def _read_sidecar(folder: Path) -> dict:
    from pocketlm.versions import check_format

    path = folder / SIDECAR_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): re-save the adapter") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object: re-save the adapter")
    if "format" in data:
        check_format(data["format"], ADAPTER_FORMAT, path, "a pocketlm adapter sidecar", "re-save the adapter")
    return data


def _read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from pocketlm.checkpoint import read_safetensors

    if (folder / WEIGHTS_FILE).is_file():
        return read_safetensors(folder / WEIGHTS_FILE)
    legacy = folder / "adapter_model.bin"  # older PEFT versions
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise UserError(f"cannot read {legacy} safely (weights_only): {exc}") from exc
    raise UserError(f"no adapter weights in {folder}: expected {WEIGHTS_FILE}")


def _split_saved_modules(cfg: dict, weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(LoRA weights, {module name: {parameter: tensor}}): PEFT saves `modules_to_save` (a classifier's
    head, `score`) whole beside A and B, under base_model.model.<module>.<parameter>."""
    names = list(cfg.get("modules_to_save") or [])
    lora_weights: dict[str, torch.Tensor] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        rest = key.removeprefix(_PREFIX)
        owner = next((n for n in names if rest.startswith(n + ".")), None)
        if owner is None:
            lora_weights[key] = tensor
        else:
            saved.setdefault(owner, {})[rest[len(owner) + 1:].replace("modules_to_save.default.", "")] = tensor
    return lora_weights, saved


def _load_saved_modules(model: nn.Module, cfg: dict, saved: dict[str, dict[str, torch.Tensor]],
                        folder: Path) -> None:
    modules = dict(model.named_modules())
    family = model.config.family
    for name in cfg.get("modules_to_save") or []:
        # PEFT lists both "classifier" and "score" for SEQ_CLS adapters and saves the one the model has.
        if name not in saved and hf.from_hf_name(name, family) in modules:
            raise UserError(f"the adapter in {folder} lists {name!r} in modules_to_save but holds no weights for "
                            "it: re-save it with PEFT")
    for hf_name, params in saved.items():
        module = modules.get(hf.from_hf_name(hf_name, family))
        if module is None:
            raise UserError(f"the adapter in {folder} also holds a trained {hf_name!r} module (PEFT "
                            "modules_to_save) that this model lacks: it is a classifier adapter, evaluate it "
                            "with `pocketlm eval RUN --classify FILE`")
        expected = module.state_dict()
        if set(params) != set(expected) or any(params[k].shape != expected[k].shape for k in params):
            raise UserError(f"the {hf_name!r} weights in the adapter in {folder} do not fit this model "
                            f"({ {k: tuple(v.shape) for k, v in params.items()} }): it was made for another model")
        with torch.no_grad():
            for k, tensor in params.items():
                expected[k].copy_(tensor)


def _config_targets(model: nn.Module, cfg: dict, folder: Path) -> list[str]:
    """The pocketlm module paths an adapter_config's target_modules / exclude_modules select."""
    family = model.config.family

    def selects(spec, hf_name: str) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            try:
                return spec == "all-linear" or re.fullmatch(spec, hf_name) is not None
            except re.error as exc:
                raise UserError(f"the adapter in {folder} has an invalid target regex {spec!r}: {exc}") from exc
        return _matches_list(hf_name, list(spec))

    target, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")
    if target is None:
        raise UserError(f"the adapter in {folder} has no target_modules: re-save it with PEFT's LoraConfig")
    candidates = block_linears(model)
    names = [n for n in candidates if selects(target, hf.to_hf_name(n, family))
             and not selects(exclude, hf.to_hf_name(n, family))]
    outside = [hf.to_hf_name(n, family) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Embedding)) and n not in candidates
               and target != "all-linear" and selects(target, hf.to_hf_name(n, family))]
    if outside:
        raise UserError(f"the adapter in {folder} adapts {', '.join(outside)}: pocketlm's LoRA covers the "
                        "linear layers of the transformer blocks only")
    if not names:
        raise UserError(f"the adapter in {folder} targets {target!r}, which matches no layer of this "
                        f"{family} model (valid names: {', '.join(_valid_names(list(candidates)))}): "
                        "it was made for another base model")
    return names


def _check_weights(model: nn.Module, names: list[str], weights: dict[str, torch.Tensor], rank: int,
                   folder: Path) -> None:
    linears = block_linears(model)
    expected = {}
    for name in names:
        layer = linears[name]
        expected[_peft_key(model, name, "lora_A")] = (rank, layer.in_features)
        expected[_peft_key(model, name, "lora_B")] = (layer.out_features, rank)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise UserError(f"the adapter weights in {folder} do not fit its config on this base: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]} (was it made for another base model?)")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise UserError(f"the adapter in {folder} does not fit this base model: {key} has shape "
                            f"{tuple(weights[key].shape)} but this base needs {shape}; it was made for "
                            "another base (pass the right one with --base)")


def _copy_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            module.lora_A.copy_(weights[_peft_key(model, name, "lora_A")])
            module.lora_B.copy_(weights[_peft_key(model, name, "lora_B")])


def load_adapter(model: nn.Module, folder: str | Path) -> dict:
    """Wrap `model` as adapter_config.json says (NF4 base for a pocketlm QLoRA adapter) and load A and B.

    `folder`: an adapter folder, a checkpoint step folder or a LoRA run (see find_adapter_folder).
    """
    folder = find_adapter_folder(folder)
    cfg = read_adapter_config(folder)
    sidecar = _read_sidecar(folder)
    names = _config_targets(model, cfg, folder)
    weights, saved = _split_saved_modules(cfg, _read_adapter_weights(folder))
    rank, alpha = cfg["r"], float(cfg.get("lora_alpha", 8))
    _check_weights(model, names, weights, rank, folder)
    _load_saved_modules(model, cfg, saved, folder)
    method = "qlora" if sidecar.get("method") == "qlora" else "lora"
    _wrap(model, names, rank, alpha, float(cfg.get("lora_dropout") or 0.0), quantize=method == "qlora",
          use_rslora=bool(cfg.get("use_rslora")))
    _copy_weights(model, weights)
    model._pocketlm_lora = {"method": method, "base": cfg.get("base_model_name_or_path"), "targets": names}
    return {"method": method, "rank": rank, "alpha": alpha, "targets": names, "folder": str(folder)}


def load_base_and_adapter(adapter_folder: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None, base: str | None = None):
    """(model, tokenizer): the base named in adapter_config.json (or `base`), wrapped with the adapter."""
    from pocketlm.checkpoint import load_model

    folder = find_adapter_folder(adapter_folder)
    cfg = read_adapter_config(folder)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"the adapter in {folder} does not name its base model: pass it with --base")
    try:
        model, tokenizer = load_model(base)
    except UserError as exc:
        raise UserError(f"cannot load the base model of the adapter in {folder}: {exc} (pass --base)") from exc
    load_adapter(model, folder)
    model.eval()
    return (model.to(device=device, dtype=dtype) if dtype else model.to(device)), tokenizer


def find_adapter_folder(source: str | Path) -> Path:
    """An adapter folder, a checkpoint step folder holding adapter/, or a LoRA run (best, else latest)."""
    from pocketlm.rundir import resolve_checkpoint

    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source} does not exist: give a LoRA run directory or an adapter folder")
    path = resolve_checkpoint(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / ADAPTER_DIR / CONFIG_FILE).is_file():
        return path / ADAPTER_DIR
    raise UserError(f"{path} holds no LoRA adapter ({ADAPTER_DIR}/{CONFIG_FILE}): it is not a LoRA/QLoRA "
                    "run or adapter folder")


def _unwrap_module(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def _run_base(step_dir: Path) -> str | None:
    """The base a run fine-tunes (`model` in RUN/config.yaml; step folders live in RUN/checkpoints/)."""
    from pocketlm.rundir import run_of_step

    run = run_of_step(step_dir)
    return _base_ref(run.read_config().get("model")) if run is not None else None


class LoraSaver:
    """WeightSaver for LoRA/QLoRA runs: a step folder gets adapter/ (PEFT files), not a full model."""

    def __init__(self, base: str | Path | None = None) -> None:
        self.base = _base_ref(base)

    def save(self, model: nn.Module, tokenizer, directory: Path) -> None:
        folder = Path(directory) / ADAPTER_DIR
        folder.mkdir(parents=True, exist_ok=True)
        model = _unwrap_module(model)
        base = self.base or getattr(model, "_pocketlm_lora", {}).get("base") or _run_base(Path(directory))
        write_adapter_files(model, folder, base)

    def load(self, model: nn.Module, directory: Path) -> None:
        """Restore the adapter weights exactly (the model was already prepared the same way)."""
        folder = Path(directory) / ADAPTER_DIR
        model = _unwrap_module(model)
        if not lora_modules(model):
            load_adapter(model, folder)
            return
        cfg = read_adapter_config(folder)
        names = list(lora_modules(model))
        weights, saved = _split_saved_modules(cfg, _read_adapter_weights(folder))
        _check_weights(model, names, weights, cfg["r"], folder)
        _copy_weights(model, weights)
        _load_saved_modules(model, cfg, saved, folder)
