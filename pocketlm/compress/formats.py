"""Number formats for compressed weights: what each format stores and the exact arithmetic back to floats.

Every function here is pure tensor math (no modules, no files), shared by the quantized layers
(pocketlm.compress.modules), the folder writer and quantization-aware training (pocketlm.compress.qat),
so that the weights a QAT run trains against are bit for bit the weights a quantized folder holds.

- int8: symmetric, one scale per group of G inputs (32 by default, as llama.cpp's Q8_0) in each output row:
  w = q * s, q in [-127, 127]. Folders written before groups had one scale per output row (still loaded).
  Why groups: measured on smollm2-135m's held-out Shakespeare, per-row scales agree with fp32 on the top
  token at 0.959 of positions in exact fp32 arithmetic, group-32 scales at 0.979 (docs/compression.md).
- int4: groups of G inputs (32, 64, 128) per output row, w = (q - 8) * s + z with q in [0, 15] (PyTorch's
  CPU int4 kernel's convention). Symmetric: z = 0 and s = m / -8 where m is the group's value of largest
  magnitude (llama.cpp's Q4_0 rule, so a group-32 folder converts to Q4_0 exactly). Asymmetric:
  s = (max - min) / 15, z = min + 8 s.
- fp8: e4m3 with one scale per output row: w = fp8(w / s) * s, s = absmax / 448.
- nf4: QLoRA's NormalFloat-4 (pocketlm.quant), blocks of 64.

Scales (and int4 zero points) are rounded to bfloat16 before the codes are chosen: the fast CPU kernels
take bf16 scales, and a bf16 value is exact in fp16 too, so the GGUF Q8_0/Q4_0 export is lossless.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from pocketlm.device import PRECISION_DTYPES
from pocketlm.errors import UserError
from pocketlm.names import QUANT_FORMATS

FLOAT_FORMATS = {"fp64": torch.float64, **PRECISION_DTYPES}  # the precisions' dtypes, and fp64 for storage
PACKED_FORMATS = ("fp8", "int8", "int4", "nf4")
FORMATS = QUANT_FORMATS
GROUP_SIZES = (32, 64, 128)
SCHEMES = ("sym", "asym")
# Bits a weight costs, scales included (for ordering formats: quantizing to a higher precision is refused).
BITS = {"fp64": 64, "fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "nf4": 4}
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class QuantSpec:
    """What `pocketlm quantize` does: the format, the int8/int4 block layers' grouping, the layers left alone."""

    format: str
    group_size: int = 32
    scheme: str = "sym"
    skip: list[str] = field(default_factory=list)  # "embeddings", "lm_head" or module-name fragments

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"unknown format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.format in ("int4", "int8") and self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.scheme not in SCHEMES:
            raise UserError(f"--scheme must be sym or asym, got {self.scheme!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_skip(text: str | list[str] | None) -> list[str]:
    if not text:
        return []
    items = text if isinstance(text, list) else text.split(",")
    return [s.strip() for s in items if s.strip()]


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest bfloat16, returned in float32 (exact in fp16 and fp32 alike)."""
    return x.to(torch.bfloat16).float()


# -- int8 -------------------------------------------------------------------------------------------
TABLE_GROUP = 32  # the int8 embedding table and output head: groups of 32 in every format (Q8_0's blocks)


def table_group(width: int) -> int | None:
    """The group size of an int8 embedding table / output head of this width (None: one scale per row)."""
    return TABLE_GROUP if width % TABLE_GROUP == 0 else None


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scales float32 holding bf16 values) of a weight [N, K]: scales [N, K/G] for
    groups of `group_size` inputs, [N] (one per row) when it is None."""
    w = w.detach().float()
    n, k = w.shape
    g = w.view(n, 1, k) if group_size is None else w.view(n, k // group_size, group_size)
    scale = bf16_round(g.abs().amax(dim=-1) / 127.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
    q = torch.round(g / scale[..., None]).clamp_(-127, 127).to(torch.int8).view(n, k)
    return q, (scale[:, 0] if group_size is None else scale)


def int8_group_size(q: torch.Tensor, scale: torch.Tensor) -> int | None:
    """The group size a (codes, scales) pair was made with; None for one scale per row."""
    return None if scale.dim() == 1 else q.shape[1] // scale.shape[1]


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = q.shape
    s = scale.float().view(n, -1)  # [N, 1] per row or [N, K/G]
    return (q.float().view(n, s.shape[1], -1) * s[..., None]).view(n, k).to(dtype)


# -- int4 -------------------------------------------------------------------------------------------
def check_group(k: int, group_size: int, name: str) -> None:
    if k % group_size:
        raise UserError(f"--group-size {group_size} does not divide the width {k} of {name}: choose a group size "
                        f"that divides it ({', '.join(str(g) for g in GROUP_SIZES if k % g == 0) or 'none fits'}) "
                        "or --skip that layer")


def int4_params(w: torch.Tensor, group_size: int, scheme: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scales [N, K/G], zero points [N, K/G] or None for sym), float32 holding bf16 values."""
    n, k = w.shape
    g = w.detach().float().view(n, k // group_size, group_size)
    if scheme == "sym":
        # llama.cpp's Q4_0: the value of largest magnitude maps to -8, so the full range [-8, 7] is used.
        idx = g.abs().argmax(dim=-1, keepdim=True)
        m = g.gather(-1, idx).squeeze(-1)
        scale = bf16_round(m / -8.0)
        scale = torch.where(scale != 0, scale, torch.ones_like(scale))
        return scale, None
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = bf16_round((hi - lo) / 15.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = bf16_round(lo + 8.0 * scale)
    return scale, zero


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Codes uint8 in [0, 15], shape [N, K] (unpacked), for given scales and zero points."""
    n, k = w.shape
    g = w.detach().float().view(n, k // group_size, group_size)
    z = zero[..., None] if zero is not None else 0.0
    q = torch.round((g - z) / scale[..., None]) + 8.0
    return q.clamp_(0, 15).to(torch.uint8).view(n, k)


def dequantize_int4_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = codes.shape
    q = codes.view(n, k // group_size, group_size).float() - 8.0
    w = q * scale.float()[..., None]
    if zero is not None:
        w = w + zero.float()[..., None]
    return w.view(n, k).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in [0, 15] -> [N, K/2] bytes: column 2j in the low nibble, 2j+1 in the high nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty(n, half * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


# -- fp8 --------------------------------------------------------------------------------------------
def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 bits as uint8 [N, K], scales float32 [N]). Stored as raw bits so that `.to(dtype)` on a
    module never turns them back into wide floats."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), scale


def dequantize_fp8(bits: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (bits.view(torch.float8_e4m3fn).float() * scale.float()[:, None]).to(dtype)


# -- fake quantization (QAT): the same arithmetic, differentiable by straight-through ---------------
def fake_quantize(w: torch.Tensor, fmt: str, group_size: int | None = 32, scheme: str = "sym") -> torch.Tensor:
    """The float weight a quantized folder would hold for `w` (float32), without gradients (int8 with
    group_size None: one scale per row)."""
    with torch.no_grad():
        if fmt == "int8":
            return dequantize_int8(*quantize_int8(w, group_size or None))
        if fmt == "int4":
            scale, zero = int4_params(w, group_size, scheme)
            return dequantize_int4_codes(int4_codes(w, scale, zero, group_size), scale, zero, group_size)
        if fmt == "fp8":
            return dequantize_fp8(*quantize_fp8(w))
    raise UserError(f"fake quantization supports int8, int4 and fp8, not {fmt!r}")


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight. Backward: the gradient passes through unchanged (Bengio et al. 2013)."""

    @staticmethod
    def forward(ctx, w, fmt, group_size, scheme):
        return fake_quantize(w, fmt, group_size, scheme).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quantize_ste(w: torch.Tensor, fmt: str, group_size: int = 32, scheme: str = "sym") -> torch.Tensor:
    return _StraightThrough.apply(w, fmt, group_size, scheme)
