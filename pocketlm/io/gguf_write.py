"""pocketlm model + tokenizer -> a GGUF file (`pocketlm export --format gguf`), for llama.cpp and friends.

The inverse of pocketlm/io/gguf.py: the same tensor names and query/key permutation, written with the
`gguf` package's GGUFWriter, optionally quantized (q8_0, q4_0, ...).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from pocketlm.atomic import disk_full_error
from pocketlm.errors import UserError
from pocketlm.io.gguf import permute_qk, pocketlm_to_gguf_name
from pocketlm.io.tokenizers import Tokenizer
from pocketlm.model import GPT
from pocketlm.names import GGUF_EXPORT_TYPES  # noqa: F401 (the types write_gguf takes)


# -- export ----------------------------------------------------------------------------------------
def _gguf_pre_name(backend: HFTokenizer) -> str:
    """The llama.cpp pre-tokenizer name for our tokenizer's split, or a UserError if GGUF cannot say it."""
    import json

    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else [pre.get("type")]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
        return "smollm"
    raise UserError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp name: "
                    "GGUF export supports GPT-2-style and SmolLM-style byte-level BPE tokenizers; use --format hf")


def write_gguf(model: GPT, tokenizer: Tokenizer, path: str | Path, dtype: str = "fp32", tensors=None) -> Path:
    """Write a GGUF file llama.cpp and transformers load: metadata, byte-level BPE tokenizer, weights in
    fp32, fp16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (1-D tensors stay fp32, as llama.cpp expects).
    `tensors`: (GGUF name, data, type) triples already in GGUF blocks, written instead of the model's weights."""
    import json

    import gguf

    types = {"fp32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
             "fp16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
             "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
             "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
             "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
             "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
             "q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
             "q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1)}
    if dtype not in types:
        raise UserError(f"GGUF export type {dtype!r} is not supported: choose one of {', '.join(types)}")
    qtype, file_type = types[dtype]
    cfg = model.config
    if tokenizer.backend.get_vocab_size(with_added_tokens=True) > cfg.embedding_rows:
        raise UserError("the tokenizer has more tokens than the model's embedding: they do not belong together")
    model_json = json.loads(tokenizer.backend.to_str())["model"]
    if model_json.get("type") != "BPE":
        raise UserError("GGUF export supports byte-level BPE tokenizers only: use --format hf")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), cfg.family)
    _add_architecture(writer, cfg, file_type)
    _add_tokenizer(writer, tokenizer, cfg, model_json)
    if tensors is not None:  # already in GGUF blocks (pocketlm.compress.gguf: quantized folders, losslessly)
        for gguf_name, data, kind in tensors:
            writer.add_tensor(gguf_name, data, raw_dtype=kind)
    else:
        _add_tensors(writer, model, dtype, qtype)
    try:
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        tmp.replace(path)  # a crash never leaves a half-written file under the final name
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from exc
        raise
    return path


def _add_architecture(writer, cfg, file_type) -> None:
    """The hyper-parameters llama.cpp reads (general.*, <family>.*)."""
    import gguf

    writer.add_type("model")
    writer.add_name(cfg.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_width)
    writer.add_head_count(cfg.n_head)
    if cfg.family == "llama":
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.embedding_rows)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)


def _add_tokenizer(writer, tokenizer: Tokenizer, cfg, model_json: dict) -> None:
    """Byte-level BPE vocabulary, token types and merges."""
    import gguf

    # Every embedding row gets a token; rows past the tokenizer are llama.cpp's [PADn] (unused).
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {a.content: a for a in tokenizer.backend.get_added_tokens_decoder().values()}
    tokens, kinds = [], []
    for i in range(cfg.embedding_rows):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        if token is None:
            kinds.append(gguf.TokenType.UNUSED)
        elif token in added:
            kinds.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            kinds.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_gguf_pre_name(tokenizer.backend))
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model_json.get("merges", [])])
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(False)


def _add_tensors(writer, model: GPT, dtype: str, qtype) -> None:
    """Every weight under its GGUF name, query/key rows permuted as llama.cpp expects, quantized to qtype."""
    import gguf

    cfg = model.config
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings and cfg.family == "llama":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        array = tensor.detach().float().cpu().numpy()
        if cfg.family == "llama" and ".attn.q_proj." in name:
            array = permute_qk(array, cfg.n_head)
        elif cfg.family == "llama" and ".attn.k_proj." in name:
            array = permute_qk(array, cfg.kv_heads)
        kind = qtype if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        if dtype.startswith("q") and array.shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # these quantized blocks are 32 values wide
        data = array if kind == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(array, kind)
        writer.add_tensor(pocketlm_to_gguf_name(name, cfg.family), data, raw_dtype=kind)
