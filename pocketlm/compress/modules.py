"""Quantized layers that compute on low-precision CPU kernels, and the swap that installs them.

Decoding (fewer than DENSE_ROWS rows) runs on pocketlm's own kernels (pocketlm.compress.kernels: int8
activations times int8 or int4 weights on AVX-512 VNNI) where the CPU has them and the compute dtype is
bf16, else on PyTorch's:
- Int8Linear: int8 codes with a bf16 scale per group of 32 inputs, on the int4 kernel below as two nibble
  planes (see the class); folders with one scale per row run on `torch.ops.aten._weight_int8pack_mm`.
- Int4Linear: `torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K/G, N, 2])`
  on the layout `_convert_weight_to_int4pack_for_cpu` makes from [N, K] codes (it needs N % 16 == 0).
- FP8Linear: no CPU kernel multiplies by a weight-only e4m3 matrix; it dequantizes the weight to bf16 per
  call (the fallback path, as NF4 does in pocketlm.quant).
- Int8Embedding: int8 rows with a scale per group of 32 (or per row); only the looked-up rows are
  dequantized. With tied embeddings the output head is an Int8Linear sharing its codes.

The kernels run with bf16 activations (`compute_dtype`): measured on this machine's CPU at batch 1, the fp32
variants of both kernels are 10-40x slower than bf16 (a reference path), the bf16 ones 2-6x faster than an
fp32 matmul. Inputs are cast to the compute dtype and outputs back to the input's dtype, so the residual
stream keeps the model's own dtype (fp32 unless loaded otherwise). On other devices, and where a kernel
does not apply, the layers dequantize and call F.linear: correct everywhere, fast only on CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.compress import formats as fm
from pocketlm.compress import kernels
from pocketlm.device import autocast_dtype

DEFAULT_COMPUTE = torch.bfloat16
# The last input cast to the compute dtype: (x, x._version, dtype, twice, cast). Holding x keeps its id from being
# reused; the version catches in-place changes. Inference only (the kernels are not used under autograd).
_LAST_CAST: list = [None]
# From this many rows (tokens) on, int8 layers dequantize their weight (0.3 ms for 1536x576) and run one
# dense bf16 matmul: at batch 1 decoding the kernels win (they read a byte per weight), but a 512-token
# prefill is compute-bound, and there the kernels were 1.3-2x slower than even an fp32 matmul.
DENSE_ROWS = 32
_INT4_TILES = 2  # innerKTiles of the CPU int4 layout (the CPU kernel ignores the value beyond validation)


class _QuantLinear(nn.Module):
    """Common parts: shape, frozen float bias, compute dtype, and the F.linear fallback."""

    kind = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None
        self.compute_dtype: torch.dtype | None = DEFAULT_COMPUTE
        self._stacked: tuple | None = None  # set on the first of projections decoded together (decode_together)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:  # the name pocketlm.quant's layers use
        return self.dequantized_weight(dtype)

    def _cdt(self, x: torch.Tensor) -> torch.dtype:
        return autocast_dtype(x.device.type) or self.compute_dtype or x.dtype

    def _cast_input(self, x: torch.Tensor, cdt: torch.dtype, twice: bool = False) -> torch.Tensor:
        """x as (-1, in_features) in the compute dtype (`twice`: [x | x], the input of grouped int8 layers).
        q/k/v (and gate/up) read the same x: it is cast once and the cast reused while x is unchanged (same
        tensor object, same version)."""
        if x.dtype == cdt and not twice:
            return x.reshape(-1, self.in_features)
        if torch.compiler.is_compiling():  # a compiled graph shares common casts by itself
            xc = x.reshape(-1, self.in_features).to(cdt)
            return torch.cat((xc, xc), dim=1) if twice else xc
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        last = _LAST_CAST[0]
        if last is not None and last[0] is x and last[1] == version and last[2] == cdt and last[3] == twice:
            return last[4]
        xc = x.reshape(-1, self.in_features).to(cdt)
        if twice:
            xc = torch.cat((xc, xc), dim=1)
        _LAST_CAST[0] = (x, version, cdt, twice, xc)
        return xc

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _uses_lowbit(self, x: torch.Tensor, cdt: torch.dtype, group_size: int | None) -> bool:
        """pocketlm's kernels serve the fast path (bf16 compute); fp32 compute keeps PyTorch's exact one."""
        return (x.device.type == "cpu" and cdt == torch.bfloat16 and kernels.fits(self.in_features, group_size)
                and kernels.available())

    uses_kernel = True  # whether PyTorch's kernel takes this layer's shape (Int4Linear: not always)

    def prepare(self, x: torch.Tensor) -> None:
        """Build the kernel layout that decoding inputs like x will use (see prepare_kernels)."""
        cdt = self._cdt(x)
        if self._uses_lowbit(x, cdt, self.group_size):
            self._lowbit_weights()
        elif self.uses_kernel:
            self._kernel_weights(cdt)

    def _fallback(self, x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        y = F.linear(x.reshape(-1, self.in_features).to(cdt), self.dequantized_weight(cdt))
        return self._finish(y, x)

    def dequantize(self) -> nn.Linear:
        """A plain float32 nn.Linear computing with the dequantized weight."""
        dev = self.bias.device if self.bias is not None else next(iter(self.buffers())).device
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dev)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight(torch.float32))
            if self.bias is not None:
                linear.bias.copy_(self.bias.float())
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class Int8Linear(_QuantLinear):
    """int8 codes [N, K] with bf16 scales per group of G inputs ([N, K/G]) or per row ([N], older folders).

    Per-row scales run on `_weight_int8pack_mm`. That kernel has no groups, so grouped codes run on the int4
    kernel as two nibble planes: with u = q + 128 = 16 hi + lo, the weight q s = (hi - 8)(16 s) + (lo - 8) s
    + 8 s, i.e. one int4 matrix [hi | lo] of width 2K with group scales (16 s, zero 0) on the first half and
    (s, zero 8 s) on the second, multiplied by [x | x]. The same bytes per weight as int8, exact (bf16 scales
    times 16 stay bf16), and one kernel call.
    """

    kind = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self._kernel: tuple[torch.Tensor, torch.Tensor, torch.dtype] | None = None
        self._lowbit: tuple[torch.Tensor, torch.Tensor] | None = None  # kernels.int8_layout, built on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = fm.TABLE_GROUP) -> Int8Linear:
        q, s = fm.quantize_int8(linear.weight, group_size)
        return cls(q, s, linear.bias)

    @property
    def group_size(self) -> int | None:
        return fm.int8_group_size(self.qweight, self.scales)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fm.dequantize_int8(self.qweight, self.scales, dtype)

    def _apply(self, fn, recurse=True):
        self._kernel = self._lowbit = self._stacked = None  # a device or dtype move invalidates the kernel's copies
        return super()._apply(fn, recurse)

    def _lowbit_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._lowbit is None:
            self._lowbit = kernels.int8_layout(self.qweight, self.scales)
        return self._lowbit

    def _kernel_weights(self, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: (codes, scales in cdt). Grouped: the int4 kernel's layout of [hi | lo] and its scales."""
        if self._kernel is not None and self._kernel[2] == cdt and self._kernel[1].device == self.scales.device:
            return self._kernel[0], self._kernel[1]
        if self.group_size is None:
            self._kernel = (self.qweight, self.scales.to(cdt), cdt)  # cast once, not per token
            return self._kernel[0], self._kernel[1]
        u = self.qweight.to(torch.int32) + 128
        s = self.scales
        pad = -self.out_features % 16  # the int4 layout needs N % 16 == 0: zero rows, sliced off the output
        if pad:
            u = torch.cat((u, u.new_full((pad, u.shape[1]), 128)))
            s = torch.cat((s, s.new_zeros(pad, s.shape[1])))
        planes = torch.cat((u >> 4, u & 15), dim=1)  # [N, 2K] codes in [0, 15]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(planes, _INT4_TILES)
        scale = torch.cat((16 * s, s), dim=1)
        zero = torch.cat((torch.zeros_like(s), 8 * s), dim=1)
        sz = torch.stack((scale.t(), zero.t()), dim=-1).to(cdt).contiguous()  # [2K/G, N, 2]
        self._kernel = (packed, sz, cdt)
        return packed, sz

    def _dense_weight(self, cdt: torch.dtype) -> torch.Tensor:
        """The weight in cdt for a dense matmul, dequantized in cdt (a bf16 product q * s is rounded to 8
        significant bits: about 1/6 of the int8 rounding error, where bf16 activations cost more)."""
        n, k = self.qweight.shape
        scales = self.scales.to(cdt).view(n, -1)
        return (self.qweight.view(n, scales.shape[1], -1).to(cdt) * scales[..., None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = self._cdt(x)
        if x.device.type != "cpu" or x.requires_grad:  # the kernels are CPU-only and have no backward
            return self._fallback(x, cdt)
        if x.numel() >= DENSE_ROWS * self.in_features:  # prefill, scoring: compute-bound, see DENSE_ROWS
            y = F.linear(self._cast_input(x, cdt), self._dense_weight(cdt))
            if self.exact_top and x.dtype != cdt:
                y = self._refine(y.to(x.dtype), x.reshape(-1, self.in_features))
            return self._finish(y, x)
        if self._uses_lowbit(x, cdt, self.group_size):
            x2 = x.reshape(-1, self.in_features).float()
            y = torch.ops.pocketlm_lowbit.int8_mm(x2, *self._lowbit_weights(), self.out_features)
            # Its activations were rounded to int8: the head's top candidates are recomputed from x itself.
            return self._finish(self._refine(y, x2) if self.exact_top else y, x)
        w, scales = self._kernel_weights(cdt)
        if self.group_size is None:
            y = torch.ops.aten._weight_int8pack_mm(self._cast_input(x, cdt), w, scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._cast_input(x, cdt, twice=True), w,
                                                           self.group_size, scales)
            if y.shape[-1] != self.out_features:
                y = y[:, :self.out_features].contiguous()
        if self.exact_top and x.dtype != cdt:
            y = self._refine(y.to(x.dtype), x.reshape(-1, self.in_features))
        return self._finish(y, x)

    exact_top = 0  # the output head sets this: see _refine

    def _refine(self, y: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Recompute the `exact_top` largest outputs of each row in x's dtype from the int8 rows.

        A bf16 output holds 8 significant bits: a logit of 16 is rounded to a multiple of 0.125, enough to swap
        the two most likely tokens. The head's top candidates are computed exactly (k rows of int8 codes,
        a few microseconds), the rest of the distribution keeps the kernel's bf16 values.
        """
        idx = y.topk(min(self.exact_top, y.shape[-1]), dim=-1).indices  # [M, k]
        flat = idx.reshape(-1)
        rows = fm.dequantize_int8(self.qweight.index_select(0, flat), self.scales.index_select(0, flat), x2.dtype)
        exact = torch.bmm(rows.view(*idx.shape, -1), x2[:, :, None]).squeeze(-1)
        return y.scatter_(-1, idx, exact.to(y.dtype))

    def extra_repr(self) -> str:
        g = self.group_size
        return super().extra_repr() + (" per row" if g is None else f" group={g}")


class Int4Linear(_QuantLinear):
    kind = "int4"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(packed.shape[1] * 2, packed.shape[0], bias)
        self.group_size = group_size
        self.register_buffer("qweight", packed.to(torch.uint8).contiguous())  # [N, K/2], see formats.pack_int4
        self.register_buffer("scales", scales.float().contiguous())  # [N, K/G]
        self.register_buffer("zeros", zeros.float().contiguous() if zeros is not None else None)
        # The kernels' own layouts, built on first use on a CPU (not saved).
        self._kernel: tuple[torch.Tensor, torch.Tensor, torch.dtype] | None = None
        self._lowbit: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, scheme: str) -> Int4Linear:
        w = linear.weight.detach().float()
        scale, zero = fm.int4_params(w, group_size, scheme)
        codes = fm.int4_codes(w, scale, zero, group_size)
        return cls(fm.pack_int4(codes), scale, zero, group_size, linear.bias)

    @property
    def scheme(self) -> str:
        return "sym" if self.zeros is None else "asym"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fm.dequantize_int4_codes(fm.unpack_int4(self.qweight), self.scales, self.zeros, self.group_size,
                                        dtype)

    @property
    def uses_kernel(self) -> bool:
        return self.out_features % 16 == 0 and self.in_features % self.group_size == 0

    def _apply(self, fn, recurse=True):  # a device or dtype move invalidates the kernel layout
        self._kernel = self._lowbit = self._stacked = None
        return super()._apply(fn, recurse)

    def _lowbit_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self._lowbit is None:
            self._lowbit = kernels.int4_layout(fm.unpack_int4(self.qweight), self.scales, self.zeros)
        return self._lowbit

    def _kernel_weights(self, cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kernel is None or self._kernel[2] != cdt:
            codes = fm.unpack_int4(self.qweight).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INT4_TILES)
            zeros = self.zeros if self.zeros is not None else torch.zeros_like(self.scales)
            sz = torch.stack((self.scales.t(), zeros.t()), dim=-1).to(cdt).contiguous()  # [K/G, N, 2]
            self._kernel = (packed, sz, cdt)
        return self._kernel[0], self._kernel[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cdt = self._cdt(x)
        # Other devices, training, and prefills or scoring (compute-bound, see DENSE_ROWS): a dense matmul.
        if x.device.type != "cpu" or x.requires_grad or x.numel() >= DENSE_ROWS * self.in_features:
            return self._fallback(x, cdt)
        if self._uses_lowbit(x, cdt, self.group_size):
            y = torch.ops.pocketlm_lowbit.int4_mm(x.reshape(-1, self.in_features).float(), *self._lowbit_weights(),
                                                  self.out_features)
            return self._finish(y, x)
        if not self.uses_kernel:
            return self._fallback(x, cdt)
        packed, sz = self._kernel_weights(cdt)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._cast_input(x, cdt), packed, self.group_size, sz)
        return self._finish(y, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f" group={self.group_size} {self.scheme}"


class FP8Linear(_QuantLinear):
    kind = "fp8 (e4m3, dequantized per call: no CPU kernel)"

    def __init__(self, bits: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(bits.shape[1], bits.shape[0], bias)
        self.register_buffer("qweight", bits.view(torch.uint8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        return cls(*fm.quantize_fp8(linear.weight), linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fm.dequantize_fp8(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fallback(x, self._cdt(x))


class Int8Embedding(nn.Module):
    """An embedding table in int8 with a scale per group of 32 (or per row); outputs in the scales' dtype."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.float().contiguous())

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        return cls(*fm.quantize_int8(emb.weight, fm.table_group(emb.embedding_dim)))

    @property
    def weight(self) -> torch.Tensor:
        """The scales: a float tensor in the table's output dtype and device, for code that reads
        `wte.weight` only for those (GPT.new_cache sizes the KV cache by it). The codes are `qweight`."""
        return self.scales

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fm.dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        scales = self.scales.view(self.num_embeddings, -1)  # [V, groups] (one group: per row)
        rows = F.embedding(idx, self.qweight).to(self.scales.dtype)
        s = F.embedding(idx, scales)
        return (rows.view(*s.shape, -1) * s[..., None]).view(rows.shape)

    def extra_repr(self) -> str:
        g = fm.int8_group_size(self.qweight, self.scales)
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 " + ("per row" if g is None else f"group={g}")


QUANT_LINEARS = (Int8Linear, Int4Linear, FP8Linear)


HEAD_EXACT_TOP = 16  # output-head logits recomputed exactly per position (Int8Linear._refine)


def mark_head(model: nn.Module) -> None:
    """The output head (an Int8Linear) recomputes its top candidates exactly: greedy decoding then matches
    the full-precision computation of the same int8 weights."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, Int8Linear):
        head.exact_top = HEAD_EXACT_TOP


def _stackable(layers: tuple[nn.Module, ...]) -> bool:
    first = layers[0]
    return type(first) in (Int8Linear, Int4Linear) and all(
        type(m) is type(first) and m.in_features == first.in_features and m.group_size == first.group_size
        and getattr(m, "scheme", None) == getattr(first, "scheme", None) for m in layers)


def _stacked_weights(layers: tuple[nn.Module, ...]) -> tuple:
    """The kernel layout of the layers' codes one above the other (built once, kept on the first layer)."""
    first = layers[0]
    if first._stacked is None:
        scales = torch.cat([m.scales.view(m.out_features, -1) for m in layers])
        if isinstance(first, Int8Linear):
            first._stacked = kernels.int8_layout(torch.cat([m.qweight for m in layers]), scales)
        else:
            codes = torch.cat([fm.unpack_int4(m.qweight) for m in layers])
            zeros = torch.cat([m.zeros for m in layers]) if first.zeros is not None else None
            first._stacked = kernels.int4_layout(codes, scales, zeros)
    return first._stacked


def _stack_applies(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> bool:
    first = layers[0]
    return (_stackable(layers) and not x.requires_grad and x.numel() < DENSE_ROWS * first.in_features
            and first._uses_lowbit(x, first._cdt(x), first.group_size))


def decode_together(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor] | None:
    """`project_together` of quantized models: the projections of one decoding input (q/k/v, gate/up) as one
    call of pocketlm's kernel, their layouts stacked, so a token makes 4 kernel calls a layer instead of 7
    (each call costs a few microseconds beyond its arithmetic). None where it does not apply: each runs alone."""
    if not _stack_applies(x, layers):
        return None
    x2 = x.reshape(-1, layers[0].in_features).float()
    n = sum(m.out_features for m in layers)
    if isinstance(layers[0], Int8Linear):
        y = torch.ops.pocketlm_lowbit.int8_mm(x2, *_stacked_weights(layers), n)
    else:
        y = torch.ops.pocketlm_lowbit.int4_mm(x2, *_stacked_weights(layers), n)
    return [m._finish(part, x) for m, part in zip(layers, y.split([m.out_features for m in layers], dim=-1))]


def _projection_groups(model: nn.Module):
    """(module, its projections of one input) for every attention and MLP that has q/k/v or gate/up."""
    for module in model.modules():
        if not hasattr(module, "project_together"):
            continue
        names = ("q_proj", "k_proj", "v_proj") if hasattr(module, "q_proj") else ("gate_proj", "up_proj")
        if all(hasattr(module, n) for n in names):
            yield module, tuple(getattr(module, n) for n in names)


def stack_projections(model: nn.Module) -> None:
    """Let quantized q/k/v and gate/up decode together (decode_together) where nothing else set the hook."""
    for module, layers in _projection_groups(model):
        if module.project_together is None and _stackable(layers):
            module.project_together = decode_together


def set_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """The dtype quantized linears compute in (bf16 by default; None = the input's dtype)."""
    for m in model.modules():
        if isinstance(m, _QuantLinear):
            m.compute_dtype = dtype


def prepare_kernels(model: nn.Module) -> None:
    """Build every quantized layer's kernel layout now (normally built on first use). A compiled decode step
    must find them built: traced while missing, the repacking would become part of every step."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.zeros((), dtype=p.dtype if p is not None else torch.float32, device=p.device if p is not None else None)
    together = set()
    for module, layers in _projection_groups(model):
        if module.project_together is decode_together and _stack_applies(x, layers):
            _stacked_weights(layers)
            together.update(id(m) for m in layers)
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)) and id(m) not in together:
            m.prepare(x)  # an input like the residual stream's
