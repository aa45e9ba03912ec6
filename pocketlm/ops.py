"""Lean autograd Functions for CPU training of Llama-family models (attention, RMSNorm, SwiGLU).

Each op gives the numbers of the plain PyTorch expression in pocketlm.model but saves less for
backward, or runs a faster backward on CPU:

- `attention`: forward is the CPU flash kernel that F.scaled_dot_product_attention calls; in bf16
  the backward recomputes the probabilities with batched bf16 matmuls (AMX), about 1.5-2x as fast
  as the flash backward (attention's FLOPs are few; the flash kernel's small tiles are slow).
- `rms_norm`: saves x and one fp32 value per row, not the fp32 copy and the normalised tensor.
- `swiglu`: saves gate and up, not silu(gate) and the product as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pocketlm.device import autocast_dtype

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Attention backward works on blocks of probabilities of about this size: the (T x T) temporaries
# stay bounded whatever T is, and blocks stay large enough for efficient matmuls.
_BLOCK_BYTES = 8 << 20
# Dtypes whose attention backward is the matmul one. In fp32 the flash backward is faster on CPU
# (fp32 matmuls dominate both, and it skips masked tiles), so fp32 and fp64 keep it; the tests
# run the matmul backward in fp32 and fp64 too, against exact references.
_MATMUL_BACKWARD_DTYPES = (torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where numerics need more than the compute dtype (row sums, gradient accumulation)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(x: torch.Tensor, n: tuple[int, int], t: tuple[int, int]) -> torch.Tensor:
    """Slices n[0]:n[1], positions t[0]:t[1] of an (N, g, T, c) tensor, as (slices, g * positions, c)."""
    return x[n[0]:n[1], :, t[0]:t[1]].reshape(n[1] - n[0], -1, x.shape[-1])


def _augmented(x: torch.Tensor, columns: list, groups: int) -> torch.Tensor:
    """x (B, H, T, c) with `columns` (tensors (B, H, T, 1) or numbers) appended, as a contiguous
    (B * H / groups, groups, T, c + len(columns)) tensor: one copy, whatever x's strides."""
    B, H, T, c = x.shape
    out = x.new_empty(B, H, T, c + len(columns))
    out[..., :c] = x
    for i, col in enumerate(columns):
        out[..., c + i:c + i + 1] = col
    return out.view(B * H // groups, groups, T, -1)


def _split(x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """x as columns of `dtype` that sum to x: one if dtype holds x exactly, else a bf16/fp16 hi + lo."""
    if x.dtype == dtype:
        return [x]
    hi = x.to(dtype)
    return [hi, (x - hi.to(x.dtype)).to(dtype)]


def _attention_backward(grad, q, k, v, out, lse, causal: bool, scale: float, needs: tuple[bool, bool, bool]):
    """dQ, dK, dV of softmax(scale Q K^T) V, from the log-sum-exp the forward saved.

    P = exp(scale Q K^T - lse), dV = P^T dO, dS = P * (dO V^T - D) with D = rowsum(dO * O),
    dQ = scale dS K, dK = scale dS^T Q: six batched matmuls (five in fp32) and four elementwise
    passes per block, in the inputs' dtype (bf16 under autocast: AMX matmuls, half the traffic).
    The matmuls accumulate in fp32 and round once, so shifts are folded into them: lse and D ride
    along as extra columns (Q | -lse/scale against K | 1, dO | -D against V | 1; a hi + lo pair in
    bf16), and scale Q K^T - lse and dO V^T - D are rounded after the cancellation. The exponent
    x = scale Q K^T - lse is large for diffuse rows (about -log T), where bf16 rounding would
    cost P about 1%, so under bf16 a second matmul (minus the rounded x_hi) gives x_lo and
    P = exp(x_hi) (1 + x_lo). Measured against fp64, the gradients' error is within 1.62x that of
    the flash backward in bf16 (which keeps P and dS in fp32 registers) and about equal in fp32.
    Masked (causal) entries may overflow to inf or nan before tril_ replaces them with zeros.
    """
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g, N = H // Hkv, B * Hkv
    dtype, acc = q.dtype, _acc_dtype(q.dtype)
    # Slice n of the (N, g, T, .) tensors holds the g query heads that share kv head n: one batched
    # matmul per slice covers the whole group, and dS^T Q sums the group's share of dK by itself.
    rowsum = (grad.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # (B, H, T, 1)
    q_aug = _augmented(q, _split(lse.unsqueeze(-1).to(acc) / -scale, dtype), g)
    do_aug = _augmented(grad, _split(-rowsum, dtype), g)
    extra = q_aug.shape[-1] - hd
    k_aug = _augmented(k, [1.0] * extra, 1).view(N, S, -1)
    v_aug = _augmented(v, [1.0] * extra, 1).view(N, S, -1)
    zero = q.new_zeros(())  # baddbmm with beta=0: a matmul that scales by alpha before rounding
    need_q, need_k, need_v = needs
    dq = torch.empty(N, g, T, hd, dtype=dtype, device=q.device) if need_q else None
    # dK and dV come out with the extra columns too (cheaper than copying Q and dO without them)
    dk = torch.zeros(N, S, hd + extra, dtype=acc, device=q.device) if need_k else None
    dv = torch.zeros(N, S, hd + extra, dtype=acc, device=q.device) if need_v else None

    budget = _BLOCK_BYTES // q.element_size()
    rows = max(1, min(T, budget // (g * S)))  # query positions per block
    if causal:  # at least two row blocks: the first needs only the first half of the keys
        rows = min(rows, (T + 1) // 2)
    slices = max(1, budget // (g * S * rows))  # kv slices per block
    for n0 in range(0, N, slices):
        n1 = min(N, n0 + slices)
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            s = min(S, t1) if causal else S  # keys after the block's last query never count
            qb = _block(q_aug, (n0, n1), (t0, t1))
            dob = _block(do_aug, (n0, n1), (t0, t1))
            kb = k_aug[n0:n1, :s].mT
            p = torch.baddbmm(zero, qb, kb, beta=0, alpha=scale)  # x = scale q.k - lse, rounded
            if dtype != acc:  # exp(x) = exp(x_hi) (1 + x_lo): the same matmul minus x_hi is x_lo
                x_lo = torch.baddbmm(p, qb, kb, beta=-1, alpha=scale)
                p.exp_().addcmul_(p, x_lo)
            else:
                p.exp_()
            if causal:  # row i of the block is position t0 + i: keep keys j <= t0 + i
                p.view(n1 - n0, g, t1 - t0, s).tril_(t0)
            if need_v:
                dv[n0:n1, :s] += torch.bmm(p.mT, dob)
            if not (need_q or need_k):
                continue
            ds = torch.bmm(dob, v_aug[n0:n1, :s].mT).mul_(p)
            if need_q:
                dq_block = torch.baddbmm(zero, ds, k_aug[n0:n1, :s, :hd], beta=0, alpha=scale)
                dq[n0:n1, :, t0:t1] = dq_block.view(n1 - n0, g, t1 - t0, hd)
            if need_k:
                dk[n0:n1, :s] += torch.baddbmm(zero, ds.mT, qb, beta=0, alpha=scale)

    def like(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:  # the gradient in x's layout
        return torch.empty_like(x).copy_(value.view(*x.shape[:-1], -1)[..., :hd])

    return (like(q, dq) if need_q else None, like(k, dk) if need_k else None,
            like(v, dv) if need_v else None)


class _Attention(torch.autograd.Function):
    """Causal or full attention, GQA-aware: flash forward on CPU, matmul backward (see module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        with torch.autocast(q.device.type, enabled=False):  # dtypes are explicit here
            out, lse = _FLASH_CPU(q, k, v, 0.0, causal, scale=scale)  # the kernel handles GQA itself
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            if q.dtype in _MATMUL_BACKWARD_DTYPES:
                grads = _attention_backward(grad, q, k, v, out, lse, ctx.causal, ctx.scale,
                                            tuple(ctx.needs_input_grad[:3]))
            else:
                grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad, q, k, v, out, lse, 0.0, ctx.causal, scale=ctx.scale)
        return *grads, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """softmax(scale q k^T [causal mask]) v for training: q (B, H, T, hd), k and v (B, Hkv, S, hd).

    H must be a multiple of Hkv (grouped-query attention: query head h reads kv head h // (H/Hkv)).
    No attention mask, dropout or KV cache: callers use F.scaled_dot_product_attention for those.
    The same numbers as F.scaled_dot_product_attention(..., enable_gqa=True) forward; gradients
    within rounding of its own. Off CPU, or when no gradient is needed, it is that function.
    """
    gqa = k.shape[1] != q.shape[1]
    kind = q.device.type
    dtype = autocast_dtype(kind)
    if dtype is not None:  # SDPA runs in the autocast dtype; so does this
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    usable = (
        _FLASH_CPU is not None and kind == "cpu" and q.dim() == 4 and q.dtype in _FLASH_DTYPES
        and q.dtype == k.dtype == v.dtype and q.shape[1] % k.shape[1] == 0
        and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    )
    if not usable:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    return _Attention.apply(q, k, v, causal, q.shape[-1] ** -0.5 if scale is None else scale)


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the norm computed in fp32 (Hugging Face).

    The plain expression saves an fp32 copy of x (when x is not fp32) and the normalised tensor; this
    saves x and the fp32 rstd (one value per row) and recomputes the rest in backward. (torch's
    fused `_fused_rms_norm` gives the same bits and rstd but was no faster on CPU: plain math here.)
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype | None):
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()  # RMSNorm.forward's expression, keeping rstd
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            normed = (xf * rstd).to(x.dtype)
            dtype = out_dtype or torch.promote_types(weight.dtype, x.dtype)
            out = torch.mul(weight, normed, out=torch.empty(x.shape, dtype=dtype, device=x.device))
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        with torch.autocast(grad.device.type, enabled=False):
            xf = x.float()
            normed = xf * rstd  # fp32; the forward's normalised values before the cast to x.dtype
            if need_w:
                grad_w = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
            if need_x:
                # d/dx of x * rstd: rstd * (g - normed * mean(g * normed)), g the grad of the normed
                # values, rounded to x.dtype as the plain expression's cast rounds it.
                gn = (grad * weight).to(x.dtype).float()
                dot = (gn * normed).mean(-1, keepdim=True)
                grad_x = torch.addcmul(gn, normed, dot, value=-1).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """pocketlm.model.RMSNorm's output, bit for bit, in `out_dtype` (default: what RMSNorm returns).

    Under bf16 autocast pass out_dtype=torch.bfloat16: the next linear layer would cast the fp32
    output to bf16 anyway, so it gets the same numbers while the output kept for backward halves.
    """
    return _RMSNorm.apply(x, weight, eps, out_dtype)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only; silu is recomputed in backward.

    The plain expression saves gate, up, silu(gate) (and its product is kept by the next linear):
    at MLP width 1536 these are the largest activations of a Llama layer. Backward uses the ops
    plain autograd uses, so gradients are bitwise the same.
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_gate = torch.ops.aten.silu_backward((grad * up).to(gate.dtype), gate)
            if ctx.needs_input_grad[1]:
                grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Llama's MLP activation) that keeps only gate and up for backward."""
    return _SwiGLU.apply(gate, up)
