"""The Hugging Face boundary: config.json and state-dict names, both ways (no loading here: see folders.py).

pocketlm's model folder *is* a Hugging Face folder: config.json (with pocketlm's own config under the
key "pocketlm"), model.safetensors with Hugging Face names and layouts, and tokenizer files. So
AutoModelForCausalLM loads what pocketlm writes, and pocketlm loads what transformers writes.
"""

from __future__ import annotations

import re

import torch

from pocketlm.errors import UserError
from pocketlm.model import ModelConfig
from pocketlm.names import FAMILIES

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
        f"{' and '.join(FAMILIES)} models"
    )
