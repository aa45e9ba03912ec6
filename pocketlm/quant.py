"""Frozen base weights: 4-bit NormalFloat (NF4) storage for QLoRA, and the LoRA matmul over them.

NF4 (Dettmers et al., QLoRA, 2023) stores each weight as one of 16 levels that are quantiles of a normal
distribution, scaled per block of 64 weights by the block's largest magnitude (absmax). Two 4-bit codes
are packed per uint8, the first element of a pair in the high nibble (bitsandbytes' and torchao's layout),
so a weight costs 4 bits + 32/64 bits of scale = 0.5625 bytes instead of 4. Double quantization of the
scales is not implemented: it would save another 0.37 bits per weight. Works on any device, CPU included.

Why our own and not torchao's NF4Tensor: torchao 0.18 does install and run on CPU with torch 2.13, but
it is a tensor subclass (state dicts, device moves and autograd all go through its dispatch table), it
logs warnings about its CUDA kernels on every import, and it would be a new runtime dependency for ~60
lines of arithmetic. The levels and the packing are the same as torchao's and bitsandbytes'.

`frozen_linear_lora` is the one autograd Function behind every LoRA layer (pocketlm.lora.LoraLinear):
the frozen weight, float or NF4, is cast or dequantized when needed and never saved for backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.device import autocast_dtype

# The 16 NF4 levels, exactly as bitsandbytes and torchao define them (normal quantiles, rescaled to
# [-1, 1], with an exact zero).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64
_CHUNK_BLOCKS = 1 << 14  # quantize this many blocks at a time: bounds the float temporaries


def _levels(device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, device=device, dtype=dtype)


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes uint8 [ceil(n/2)], absmax float32 [n_blocks]) of a tensor, blockwise over its flat view.

    The flat tensor is zero-padded to a whole number of blocks; `dequantize_nf4` drops the padding.
    """
    if block_size % 2:
        raise ValueError("block_size must be even: two codes share a byte")
    flat = weight.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    levels = _levels(flat.device)
    # Nearest level = bucket among the midpoints between consecutive levels.
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=flat.device)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start:start + _CHUNK_BLOCKS]
        scale = absmax[start:start + _CHUNK_BLOCKS].clamp_min(torch.finfo(torch.float32).tiny)
        codes[start:start + _CHUNK_BLOCKS] = torch.bucketize(chunk / scale[:, None], midpoints).to(torch.uint8)
    codes = codes.view(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


_PAIR_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
# A pair of values in these dtypes fits one integer: decoding a byte is then one 1-D gather, the fastest
# gather there is (about 5x faster than indexing a (256, 2) table on CPU).
_PAIR_INT = {torch.float32: torch.int64, torch.bfloat16: torch.int32, torch.float16: torch.int32}


def _pair_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The two levels every packed byte stands for: (256,) pair-integers, or (256, 2) for other dtypes."""
    key = (device, dtype)
    if key in _PAIR_TABLES:
        return _PAIR_TABLES[key]
    levels = _levels(device, dtype)
    byte = torch.arange(256, device=device)
    pairs = torch.stack((levels[byte >> 4], levels[byte & 0x0F]), dim=1).contiguous()
    table = pairs.view(_PAIR_INT[dtype]).view(256) if dtype in _PAIR_INT else pairs
    if not torch.compiler.is_compiling():  # a compiled graph builds it itself (it must not leak out)
        _PAIR_TABLES[key] = table
    return table


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an NF4 tensor stands for, in `dtype`."""
    table = _pair_table(packed.device, dtype)
    if table.dim() == 1:
        values = torch.index_select(table, 0, packed.int()).view(dtype)
    else:
        values = table[packed.long()]
    values = values.view(absmax.shape[0], -1) * absmax.to(dtype)[:, None]
    numel = 1
    for d in shape:
        numel *= d
    return values.view(-1)[:numel].view(shape)


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is held in NF4 and dequantized on the fly in forward.

    The codes and scales are buffers (they move with .to(device) and are not parameters); the bias, if
    any, stays in full precision and frozen. `weight_for(dtype)` gives the dequantized weight.
    """

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, absmax: torch.Tensor,
                 bias: torch.Tensor | None, block_size: int = BLOCK_SIZE) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_absmax", absmax)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = BLOCK_SIZE) -> NF4Linear:
        packed, absmax = quantize_nf4(linear.weight, block_size)
        return cls(linear.in_features, linear.out_features, packed, absmax, linear.bias, block_size)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4(self.weight_packed, self.weight_absmax, self.weight_shape, dtype)

    def dequantize(self) -> nn.Linear:
        """A plain nn.Linear with the dequantized weight (float32)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight_packed.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight_for(torch.float32))
            if self.bias is not None:
                linear.bias.copy_(self.bias.float())
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = self.bias.to(dtype) if self.bias is not None else None
        # No autograd through the weight (frozen); F.linear keeps only the dequantized weight for
        # backward, which the LoRA wrapper avoids by dequantizing again instead.
        return F.linear(x.to(dtype), self.weight_for(dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in: the autocast dtype when autocast is on, else x's dtype."""
    return autocast_dtype(x.device.type) or x.dtype


def quantized_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (a tied tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


# -- the LoRA matmul over a frozen (float or NF4) weight ---------------------------------------------
def _base_weight(weight: torch.Tensor, absmax: torch.Tensor | None, shape: tuple[int, int],
                 dtype: torch.dtype) -> torch.Tensor:
    if absmax is not None:  # NF4 codes
        return dequantize_nf4(weight, absmax, shape, dtype)
    return weight.to(dtype)


class _FrozenLinearLora(torch.autograd.Function):
    """y = h W^T + b + s (hd A^T) B^T with W frozen (float, or NF4 codes + absmax), where the layer
    input h is x, or silu(gate) * x when a SwiGLU gate is given (Llama's down_proj), and hd =
    dropout(h) or h.

    Works on 2-D views; the low-rank terms are fused into the big GEMMs (addmm with alpha = s). With a
    gate, h is not saved but recomputed in backward from gate and x (the up projection), which
    autograd keeps anyway: a SwiGLU MLP then saves two (tokens x width) tensors instead of four.
    """

    @staticmethod
    def forward(ctx, x, gate, xd, weight, absmax, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        out_f, in_f = lora_b.shape[0], lora_a.shape[1]
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
            h = x if gate is None else F.silu(gate) * x
            x2 = h.reshape(-1, in_f).to(dtype)
            w = _base_weight(weight, absmax, (out_f, in_f), dtype)
            y = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
            xa = (x2 if xd is None else xd.reshape(-1, in_f).to(dtype)) @ lora_a.to(dtype).t()  # (N, rank)
            y.addmm_(xa, lora_b.to(dtype).t(), alpha=scaling)
        ctx.save_for_backward(x if xd is None else xd, gate, xa, weight, absmax, lora_a, lora_b)
        ctx.scaling, ctx.dtype, ctx.dropout, ctx.x_dtype = scaling, dtype, xd is not None, h.dtype
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad):
        xd, gate, xa, weight, absmax, lora_a, lora_b = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.dtype
        out_f, in_f = lora_b.shape[0], lora_a.shape[1]
        need_x, need_gate, need_xd, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 1, 2, 6, 7))
        grad_x = grad_gate = grad_xd = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            up = None
            if gate is not None:  # recompute the SwiGLU product instead of having kept it
                up, act = xd, F.silu(gate)
                xd = act * up
            g2 = grad.reshape(-1, out_f).to(dtype)
            gb = g2 @ lora_b.to(dtype)  # (N, rank)
            if need_b:
                grad_b = (g2.t() @ xa).mul_(s).to(lora_b.dtype)
            if need_a:  # thin (rank x N) @ (N x in): computed in xd's dtype, no cast of the big operand
                xd2 = xd.reshape(-1, in_f)
                grad_a = (gb.t().to(xd2.dtype) @ xd2).mul_(s).to(lora_a.dtype)
            if need_x or need_gate:
                gx = g2 @ _base_weight(weight, absmax, (out_f, in_f), dtype)
                if not ctx.dropout:
                    gx.addmm_(gb, lora_a.to(dtype), alpha=s)
                grad_x = gx.view(*grad.shape[:-1], in_f).to(ctx.x_dtype)
                if up is not None:  # through h = silu(gate) * up, with the kernels autograd would use
                    grad_gate = torch.ops.aten.silu_backward(grad_x * up, gate) if need_gate else None
                    grad_x = grad_x * act if need_x else None
            if need_xd:
                grad_xd = (gb @ lora_a.to(dtype)).mul_(s).view(*grad.shape[:-1], in_f).to(xd.dtype)
        return grad_x, grad_gate, grad_xd, None, None, None, grad_a, grad_b, None, None


class _SharedInputLora(torch.autograd.Function):
    """Several frozen linears (each optionally with a LoRA update) on one input, as one layer:
    y = x [W_1; ...; W_n]^T + [b_1; ...; b_n] + (x [A_1; ...; A_n]^T) diag(s_1 B_1, ..., s_n B_n)^T.

    Llama's q/k/v (576 -> 576, 192, 192 in smollm2) become one 576 -> 960 GEMM, gate/up one 576 -> 3072,
    the input gradient one GEMM instead of n GEMMs and n - 1 sums, and the adapters' thin matmuls one
    each instead of one per layer. The frozen weights are cast and concatenated per call (forward and
    backward), never kept: a LoRA step holds no second copy of the base. Works on 2-D views.
    """

    @staticmethod
    def forward(ctx, x, frozen, scalings, dtype, *adapters):
        # frozen: ((weight, absmax, (out, in), bias), ...); adapters: (A_1..A_n, B_1..B_n) or ()
        in_f = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
            x2 = x.reshape(-1, in_f).to(dtype)
            y = x2 @ _cat_weights(frozen, dtype).t()
            if any(f[3] is not None for f in frozen):
                y += torch.cat([f[3].to(dtype) if f[3] is not None else torch.zeros(f[2][0], dtype=dtype,
                                                                                      device=x.device)
                                for f in frozen])
            xa = None
            if adapters:
                n = len(frozen)
                xa = x2 @ torch.cat([a.to(dtype) for a in adapters[:n]]).t()  # (N, sum of ranks)
                y.addmm_(xa, _scaled_block_diag(adapters[n:], scalings, dtype).t())
        ctx.save_for_backward(x, xa, *adapters)
        ctx.frozen, ctx.scalings, ctx.dtype = frozen, scalings, dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, xa, *adapters = ctx.saved_tensors
        frozen, scalings, dtype = ctx.frozen, ctx.scalings, ctx.dtype
        n, in_f = len(frozen), x.shape[-1]
        grads = [None] * len(adapters)
        with torch.autocast(grad.device.type, enabled=False):
            g2 = grad.reshape(-1, grad.shape[-1]).to(dtype)
            need_x = ctx.needs_input_grad[0]  # not in the first block: the embeddings are frozen
            gx = g2 @ _cat_weights(frozen, dtype) if need_x else None
            if adapters:
                lora_a, lora_b = adapters[:n], adapters[n:]
                gbs = g2 @ _scaled_block_diag(lora_b, scalings, dtype)  # (N, sum of ranks): s_i g_i B_i
                if need_x:
                    gx.addmm_(gbs, torch.cat([a.to(dtype) for a in lora_a]))
                x2 = x.reshape(-1, in_f)  # thin (rank x N) @ (N x in) in x's dtype: no cast of the big operand
                grad_a = gbs.t().to(x2.dtype) @ x2
                rows = cols = 0
                for i, (a, b, s) in enumerate(zip(lora_a, lora_b, scalings)):
                    r, out_f = a.shape[0], b.shape[0]
                    grads[i] = grad_a[cols:cols + r].to(a.dtype)
                    grads[n + i] = (g2[:, rows:rows + out_f].t() @ xa[:, cols:cols + r]).mul_(s).to(b.dtype)
                    rows, cols = rows + out_f, cols + r
            grad_x = gx.view(*grad.shape[:-1], in_f).to(x.dtype) if need_x else None
        return grad_x, None, None, None, *grads


def _cat_weights(frozen, dtype: torch.dtype) -> torch.Tensor:
    """[W_1; ...; W_n] in dtype, each dequantized or cast once straight into its rows."""
    out = torch.empty(sum(f[2][0] for f in frozen), frozen[0][2][1], dtype=dtype, device=frozen[0][0].device)
    row = 0
    for weight, absmax, shape, _ in frozen:
        rows = out[row:row + shape[0]]
        if absmax is None:
            rows.copy_(weight)  # the cast happens in the copy: no temporary
        else:
            rows.copy_(_base_weight(weight, absmax, shape, dtype))
        row += shape[0]
    return out


def _scaled_block_diag(lora_b, scalings, dtype: torch.dtype) -> torch.Tensor:
    """diag(s_1 B_1, ..., s_n B_n): (sum of outs, sum of ranks); the zeros cost rank-sized work only."""
    return torch.block_diag(*[(b * s).to(dtype) for b, s in zip(lora_b, scalings)])


def shared_input_lora(x, frozen, scalings, dtype: torch.dtype, adapters=()) -> torch.Tensor:
    """The outputs of n layers on x side by side (see _SharedInputLora); differentiable in x and the
    adapters (A_1..A_n, B_1..B_n) only."""
    return _SharedInputLora.apply(x, tuple(frozen), tuple(scalings), dtype, *adapters)


def frozen_linear_lora(x, xd, weight, absmax, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype,
                       gate: torch.Tensor | None = None):
    """h W^T + b + scaling * (xd A^T) B^T with h = x, or silu(gate) * x; differentiable in x, gate, xd,
    A and B only (see _FrozenLinearLora). A gate needs xd = None (no LoRA dropout)."""
    if gate is not None and xd is not None:
        raise ValueError("a SwiGLU gate cannot be combined with LoRA dropout: pass the product instead")
    return _FrozenLinearLora.apply(x, gate, xd, weight, absmax, bias, lora_a, lora_b, scaling, dtype)
