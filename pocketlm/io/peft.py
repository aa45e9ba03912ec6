"""PEFT adapter folders: what a LoRA/QLoRA run saves and loads, in PEFT's format.

adapter_config.json + adapter_model.safetensors with keys `base_model.model.<Hugging Face module
path>.lora_A.weight` (PEFT drops the adapter name "default" on save); A/B layouts are nn.Linear's, a
GPT-2 Conv1D base only sets fan_in_fan_out=true. pocketlm_adapter.json beside them records what PEFT has
no field for (QLoRA's NF4 base). The layers themselves are pocketlm.lora; a base plus its adapter is
loaded by pocketlm.io.load_model(..., adapter=...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from pocketlm.atomic import AtomicDir
from pocketlm.errors import UserError
from pocketlm.io import hf
from pocketlm.io.folders import read_safetensors
from pocketlm.lora import (
    _base_ref,
    _matches_list,
    _valid_names,
    _wrap,
    block_linears,
    lora_modules,
    peft_target_modules,
)
from pocketlm.quant import BLOCK_SIZE, NF4Linear
from pocketlm.rundir import resolve_checkpoint, run_of_step

ADAPTER_DIR = "adapter"  # a LoRA run's step folder holds its adapter here
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "pocketlm_adapter.json"
ADAPTER_FORMAT = "pocketlm.adapter.v1"
_PREFIX = "base_model.model."


def _peft_key(model: nn.Module, name: str, which: str) -> str:
    return f"{_PREFIX}{hf.to_hf_name(name, model.config.family)}.{which}.weight"




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


def find_adapter_folder(source: str | Path) -> Path:
    """An adapter folder, a checkpoint step folder holding adapter/, or a LoRA run (best, else latest)."""
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


def adapter_folder_in(folder: Path) -> Path | None:
    """`folder` itself when it is an adapter folder, its adapter/ when it is a LoRA checkpoint, else None."""
    for candidate in (folder, folder / ADAPTER_DIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter was trained on (base_model_name_or_path in adapter_config.json)."""
    folder = find_adapter_folder(folder)
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if not base:
        raise UserError(f"the adapter in {folder} does not name its base model: load the base and pass the "
                        "adapter (pocketlm.io.load_model(BASE, adapter=...); --adapter on the command line)")
    return str(base)


def _unwrap_module(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def _run_base(step_dir: Path) -> str | None:
    """The base a run fine-tunes (`model` in RUN/config.yaml; step folders live in RUN/checkpoints/)."""
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
