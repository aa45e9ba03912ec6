"""Model folders: a Hugging Face folder (config.json, model.safetensors, tokenizer files) plus pocketlm.json.

`save_model` writes one atomically (a temporary folder renamed into place); `load_model_folder` reads
one, or any other folder kind listed in FOLDER_KINDS (quantized folders from `pocketlm quantize`).
To add a folder kind, append a FolderKind naming its module and two functions: nothing else changes.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pocketlm.atomic import AtomicDir
from pocketlm.errors import UserError
from pocketlm.io import hf
from pocketlm.io.builtins import read_tokenizer
from pocketlm.io.tokenizers import Tokenizer, has_tokenizer_files, read_json_file
from pocketlm.model import GPT


@dataclass(frozen=True)
class FolderKind:
    """A kind of model folder besides the plain Hugging Face one.

    `module` is imported only when a folder is checked, so the kind's module may itself use pocketlm.io
    (imports stay one-way); `matches` names its `(folder) -> bool`, `load` its
    `(folder, device=..., dtype=...) -> (GPT, Tokenizer)`.
    """

    name: str
    module: str
    matches: str
    load: str

    def function(self, attr: str):
        return getattr(importlib.import_module(self.module), attr)


# Checked in order before a folder is read as a plain model folder.
FOLDER_KINDS: list[FolderKind] = [
    FolderKind("quantized (pocketlm quantize)", "pocketlm.compress.folder", "is_quantized_folder", "load_quantized"),
    FolderKind("float format (pocketlm quantize --format fp16|bf16|fp64)", "pocketlm.compress.folder",
               "is_float_format_folder", "load_float_format"),
]


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


def folder_kind(folder: str | Path) -> FolderKind | None:
    """The FolderKind a folder is, or None for a plain model folder."""
    for kind in FOLDER_KINDS:
        if kind.function(kind.matches)(Path(folder)):
            return kind
    return None


def load_model_folder(folder: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """A model folder of any kind (FOLDER_KINDS first, then a plain Hugging Face folder)."""
    kind = folder_kind(folder)
    if kind is not None:
        return kind.function(kind.load)(Path(folder), device=device, dtype=dtype)
    return load_plain_folder(folder, device=device, dtype=dtype)


def load_plain_folder(folder: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """A Hugging Face model folder (pocketlm's, or one transformers wrote) and its tokenizer."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise UserError(f"{folder} is not a model folder: config.json is missing")
    check_model_info(folder)
    tokenizer = read_tokenizer(folder) if has_tokenizer_files(folder) else None
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
        tokenizer = read_tokenizer(config.tokenizer or "gpt2")
    if tokenizer is None:
        raise UserError(f"no tokenizer in {folder}, and its config names {config.tokenizer!r}, which is not a "
                        "built-in tokenizer: copy the tokenizer files of the model it came from into it")
    if tokenizer.vocab_size > config.embedding_rows:
        raise UserError(f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but the model's embedding "
                        f"has only {config.embedding_rows} rows: the tokenizer belongs to another model")
    model = GPT.empty(config)
    load_state_into(model, read_hf_weights(folder), str(folder))
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype else model.to(device), tokenizer
