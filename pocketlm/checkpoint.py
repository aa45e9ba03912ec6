"""Model folders and run checkpoints, written atomically.

A model folder is a Hugging Face folder plus `pocketlm.json`. A directory is written under a temporary
name and renamed into place, and the `latest`/`best` pointers of a run are replaced with os.replace, so a
crash mid-save never leaves a corrupt checkpoint where a loader would look.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pocketlm import hf
from pocketlm.atomic import AtomicDir, atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)
from pocketlm.errors import UserError
from pocketlm.model import GPT
from pocketlm.rundir import RunDir, resolve_checkpoint
from pocketlm.tokenizer import Tokenizer, load_tokenizer, read_json_file


def write_model_files(model: GPT, tokenizer: Tokenizer | None, directory: Path, metadata: dict | None = None) -> None:
    """Write a model folder's files into an existing directory (not atomic; see save_model)."""
    config = model.config
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    save_file(hf.to_hf_state_dict(state, config), str(directory / "model.safetensors"), metadata={"format": "pt"})
    dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf.to_hf_config(config, dtype), indent=2) + "\n")
    info = {"format": MODEL_FORMAT, **(metadata or {})}
    if tokenizer is not None:
        tokenizer.save(directory)
        info["tokenizer"] = tokenizer.describe()
    (directory / "pocketlm.json").write_text(json.dumps(info, indent=2) + "\n")


MODEL_FORMAT = "pocketlm.model.v1"


def check_model_info(folder: Path) -> None:
    """A model folder's pocketlm.json (optional: plain Hugging Face folders have none) must be a version this
    pocketlm reads."""
    from pocketlm.versions import check_format

    path = folder / "pocketlm.json"
    if not path.is_file():
        return
    info = read_json_file(path, "model metadata")
    if not isinstance(info, dict):
        raise UserError(f"model metadata {path} is not a JSON object: restore the model folder")
    check_format(info.get("format", MODEL_FORMAT), MODEL_FORMAT, path, "a pocketlm model folder",
                 "export the model again")


def save_model(model: GPT, tokenizer: Tokenizer | None, directory: str | Path, metadata: dict | None = None) -> Path:
    with AtomicDir(directory) as tmp:
        write_model_files(model, tokenizer, tmp, metadata)
    return Path(directory)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read weights {path}: {exc} (the file is truncated or not safetensors; "
                        "re-download or re-export it)") from exc


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, sharded safetensors (index json), or pytorch_model.bin loaded weights_only."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = read_json_file(index, "weights index").get("weight_map") if index.stat().st_size else None
        if not isinstance(weight_map, dict):
            raise UserError(f"weights index {index} has no weight_map: restore the model folder")
        shards = sorted(set(weight_map.values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    bin_path = folder / "pytorch_model.bin"
    if bin_path.exists():
        try:
            return torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise UserError(f"cannot read {bin_path} safely (weights_only): {exc}") from exc
    raise UserError(f"no weights in {folder}: expected model.safetensors, a sharded safetensors index, "
                    "or pytorch_model.bin")


def load_state_into(model: GPT, hf_state: dict[str, torch.Tensor], where: str) -> None:
    state = hf.from_hf_state_dict(hf_state, model.config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if unexpected == ["score.weight"] and not missing:  # a sequence classifier's head (pocketlm.classify)
        raise UserError(f"{where} is a classifier (it has a classification head): evaluate it with "
                        "`pocketlm eval RUN --classify FILE`; it does not generate text")
    if missing or unexpected:
        raise UserError(f"weights in {where} do not fit the model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]} (is the config.json from another model?)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"weights in {where} do not fit the model: {name} has shape {tuple(tensor.shape)}, "
                            f"the config asks for {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    from pocketlm.compress import folder as quantized  # `pocketlm quantize` folders load through here too

    folder = Path(folder)
    if quantized.is_quantized_folder(folder):
        return quantized.load_quantized(folder, device=device, dtype=dtype)
    dtype = dtype or quantized.float_format_dtype(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise UserError(f"{folder} is not a model folder: config.json is missing")
    check_model_info(folder)
    tokenizer = load_tokenizer(folder) if _has_tokenizer(folder) else None
    raw_config = read_json_file(config_path, "model config")
    if not isinstance(raw_config, dict):
        raise UserError(f"model config {config_path} is not a JSON object: restore the model folder")
    try:
        config = hf.from_hf_config(raw_config, name=folder.name,
                                   tokenizer=str(folder) if tokenizer is not None else "")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model config {config_path} is incomplete or invalid ({type(exc).__name__}: {exc}): "
                        "restore the model folder") from None
    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer or "gpt2")
    if tokenizer.vocab_size > config.embedding_rows:
        raise UserError(f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but the model's embedding "
                        f"has only {config.embedding_rows} rows: the tokenizer belongs to another model")
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty gives the shared meta tensor two separate storages: re-tie
        model.lm_head.weight = model.transformer.wte.weight
    load_state_into(model, read_hf_weights(folder), str(folder))
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype else model.to(device), tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


# -- runs -----------------------------------------------------------------------------------------
def checkpoint_dir(run: Path, which: str = "best") -> Path | None:
    """The step folder a run's `best` or `latest` pointer names, or None if there is none."""
    return RunDir(run).checkpoint(which)


def resolve_model_dir(source: str | Path) -> Path:
    """A run directory (its best, else latest checkpoint) or a model folder, as a model folder path."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source} does not exist: give a run directory, a model folder or a built-in model name")
    return resolve_checkpoint(path)


def load_model(source: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """Any model source: a run directory, a model folder, or (via pocketlm.hf) a base name, GGUF or Hub id."""
    resolver = getattr(hf, "load_base_model", None)
    path = Path(str(source)).expanduser()
    if not path.exists() and resolver is not None:
        return resolver(str(source), device=device, dtype=dtype)
    model_dir = resolve_model_dir(path)
    if (model_dir / "adapter").is_dir() and not (model_dir / "config.json").exists():
        from pocketlm import lora  # a LoRA run's checkpoint: base + adapter

        return lora.load_base_and_adapter(model_dir / "adapter", device=device, dtype=dtype)
    if model_dir.is_file() and resolver is not None:
        return resolver(str(model_dir), device=device, dtype=dtype)
    return load_model_folder(model_dir, device=device, dtype=dtype)
