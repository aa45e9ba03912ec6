"""GGUF export of quantized folders, block for block: int8 -> Q8_0, int4 group-32 sym -> Q4_0, asym -> Q4_1.

The codes are copied, not re-quantized. An int8 group of 32 is a Q8_0 block (the same rule, w = q d); an
int8 row's scale (folders with per-row scales) becomes the scale of each of its 32-wide blocks. int8 groups
of 64 or 128 have no Q8_0 form (a one-line error); an int4 group of 32 is a Q4_0 block (w = (q - 8) d, the same rule) or a Q4_1 block (w = q d + m with
m = zero - 8 d). Scales are bf16 values, which fp16 holds exactly, so Q8_0 and Q4_0 are lossless; Q4_1's m is
rounded to fp16 (a relative error below 1e-3 of the group's minimum). The int8 embedding table is written as
Q8_0 in every file (llama.cpp mixes block types per tensor). Other combinations raise a UserError that says
which quantization the file type needs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pocketlm.compress import formats as fm
from pocketlm.compress.modules import Int4Linear, Int8Embedding, Int8Linear
from pocketlm.errors import UserError

EXPORTABLE = ("q8_0", "q4_0", "q4_1")
_NEED = {"q8_0": "int8 --group-size 32", "q4_0": "int4 --group-size 32 --scheme sym", "q4_1": "int4 --group-size 32 --scheme asym"}


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def q8_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """int8 codes [N, K] with scales per group of 32 [N, K/32] or per row [N] -> Q8_0 bytes [N, K/32 * 34]."""
    n, k = codes.shape
    q = codes.numpy().astype(np.int8).reshape(n, k // 32, 32).view(np.uint8)
    d = scales.float().numpy()
    d = np.repeat(d[:, None], k // 32, axis=1) if d.ndim == 1 else d
    return np.concatenate([_fp16_bytes(d), q], axis=-1).reshape(n, -1)


def q4_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> np.ndarray:
    """int4 codes [N, K] (0..15), group 32 -> Q4_0 (zeros None) or Q4_1 bytes [N, K/32 * (18|20)]."""
    n, k = codes.shape
    q = codes.numpy().astype(np.uint8).reshape(n, k // 32, 32)
    packed = q[..., :16] | (q[..., 16:] << np.uint8(4))  # GGML: byte j holds values j and j + 16
    d = scales.float().numpy()
    parts = [_fp16_bytes(d)]
    if zeros is not None:
        parts.append(_fp16_bytes(zeros.float().numpy() - 8.0 * d))
    return np.concatenate([*parts, packed], axis=-1).reshape(n, -1)


def _check(model: nn.Module, dtype: str) -> None:
    if dtype not in EXPORTABLE:
        raise UserError(f"a quantized folder exports to GGUF as {', '.join(EXPORTABLE)} (its own codes, losslessly); "
                        f"--dtype {dtype} would quantize twice: export the original model instead")
    from pocketlm.compress.modules import FP8Linear
    from pocketlm.quant import NF4Linear

    for name, m in model.named_modules():
        if not isinstance(m, (Int8Linear, Int4Linear, FP8Linear, NF4Linear)) or name == "lm_head":
            continue  # float layers go out as fp32, the int8 table and head as Q8_0 in every file type
        if dtype == "q8_0":
            ok = isinstance(m, Int8Linear) and m.group_size in (None, 32)
        else:
            ok = isinstance(m, Int4Linear) and m.group_size == 32 and m.scheme == ("sym" if dtype == "q4_0" else "asym")
        if not ok:
            raise UserError(f"GGUF {dtype.upper()} cannot hold {name} ({m.extra_repr()}) without quantizing it again: "
                            f"make the folder with `pocketlm quantize SOURCE --format {_NEED[dtype]}`, or export "
                            "the original model with this --dtype")


@torch.no_grad()
def quantized_tensors(model: nn.Module, dtype: str) -> list[tuple[str, np.ndarray, object]]:
    """(GGUF name, data, GGML type) for every tensor of a quantized pocketlm model."""
    import gguf

    from pocketlm.io.gguf import permute_qk, pocketlm_to_gguf_name

    _check(model, dtype)
    cfg = model.config
    T = gguf.GGMLQuantizationType
    heads = {".attn.q_proj": cfg.n_head, ".attn.k_proj": cfg.kv_heads} if cfg.family == "llama" else {}
    skip_head = cfg.tie_embeddings and cfg.family == "llama"  # llama.cpp reuses token_embd
    out = []

    def rows(name: str, a):  # llama q/k rows in llama.cpp's interleaved order (whole rows move)
        h = next((v for k, v in heads.items() if name.endswith(k)), None)
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
        return permute_qk(a, h) if h else a

    def gguf_name(name: str) -> str:
        return pocketlm_to_gguf_name(name, cfg.family)

    for name, m in model.named_modules():
        if name == "lm_head" and skip_head:
            continue
        if isinstance(m, (Int8Embedding, Int8Linear)):
            group = fm.int8_group_size(m.qweight, m.scales)
            if m.qweight.shape[1] % 32 or group not in (None, 32):
                raise UserError(f"{name} ({m.extra_repr()}) has no Q8_0 form (blocks of 32): export the original "
                                "model, or quantize it with --format int8 --group-size 32")
            q, sc = rows(name, m.qweight), rows(name, m.scales)
            out.append((gguf_name(f"{name}.weight"), q8_0_blocks(torch.from_numpy(q), torch.from_numpy(sc)), T.Q8_0))
        elif isinstance(m, Int4Linear):
            codes, sc = rows(name, fm.unpack_int4(m.qweight)), rows(name, m.scales)
            z = rows(name, m.zeros) if m.zeros is not None else None
            blocks = q4_blocks(torch.from_numpy(codes), torch.from_numpy(sc),
                               torch.from_numpy(z) if z is not None else None)
            out.append((gguf_name(f"{name}.weight"), blocks, T.Q4_1 if z is not None else T.Q4_0))
        for pname, p in m.named_parameters(recurse=False):  # float weights, biases, norms
            out.append((gguf_name(f"{name}.{pname}"), rows(name, p.float()), T.F32))
    return out


def export_quantized_gguf(model: nn.Module, tokenizer, path, dtype: str):
    from pocketlm.io.gguf_write import write_gguf

    tensors = quantized_tensors(model, dtype)  # every check before the file is opened
    return write_gguf(model, tokenizer, path, dtype=dtype, tensors=tensors)
