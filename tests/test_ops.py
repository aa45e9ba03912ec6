"""pocketlm.ops: the same numbers as the plain expressions in pocketlm.model, less saved for backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pocketlm.ops as ops
from pocketlm.model import RMSNorm


def _heads(B: int, H: int, T: int, hd: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """(B, H, T, hd) in the model's layout: a transposed view of (B, T, H, hd)."""
    return (torch.randn(B, T, H, hd) * scale).to(dtype).transpose(1, 2).requires_grad_()


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


@pytest.fixture(autouse=True)
def _matmul_backward_everywhere(monkeypatch):
    """Run the matmul backward in fp32 and fp64 too (by default they keep the flash backward), so
    that it is checked against exact references."""
    monkeypatch.setattr(ops, "_MATMUL_BACKWARD_DTYPES", _ALL_FLOAT)


_ALL_FLOAT = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that row and slice blocking (and partial last blocks) are exercised."""
    monkeypatch.setattr(ops, "_BLOCK_BYTES", 2800)


@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "blocked"])
def test_attention_matches_sdpa_fp32(heads, causal, blocked, monkeypatch):
    if blocked:
        monkeypatch.setattr(ops, "_BLOCK_BYTES", 2800)  # T=37 rows split 7 + 7 + ... + 2
    torch.manual_seed(0)
    H, Hkv = heads
    q, k, v = _heads(2, H, 37, 16), _heads(2, Hkv, 37, 16), _heads(2, Hkv, 37, 16)
    grad = torch.randn(2, H, 37, 16)
    out = ops.attention(q, k, v, causal=causal)
    ref = _sdpa(q, k, v, causal)
    assert torch.equal(out, ref)
    for ours, theirs in zip(_grads(out, (q, k, v), grad), _grads(ref, (q, k, v), grad)):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_attention_explicit_scale_and_partial_grads(small_blocks):
    torch.manual_seed(1)
    q, k, v = _heads(1, 6, 20, 8), _heads(1, 3, 20, 8), _heads(1, 3, 20, 8)
    k.requires_grad_(False)  # e.g. a frozen projection: no dK work, dQ and dV still right
    grad = torch.randn(1, 6, 20, 8)
    out = ops.attention(q, k, v, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    assert torch.equal(out, ref)
    for ours, theirs in zip(_grads(out, (q, v), grad), _grads(ref, (q, v), grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_gradcheck_fp64(causal, monkeypatch):
    monkeypatch.setattr(ops, "_BLOCK_BYTES", 240)  # blocks of 2 query rows (of 7) per kv slice
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, h, 7, 3, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, causal=causal), (q, k, v))


def _reference_grads_fp64(q, k, v, grad, causal):
    """Gradients of attention computed in fp64 from the same (bf16) inputs: the exact answer."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, 1).mT / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    out = scores.softmax(-1) @ v.repeat_interleave(group, 1)
    return _grads(out, (q, k, v), grad.double())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("spread", [0.5, 2.0], ids=["diffuse", "peaked"])
def test_attention_bf16_as_accurate_as_the_flash_backward(causal, spread, small_blocks):
    # Both backwards round to bf16 (unit roundoff 2^-8) on the way, so neither is exact. The flash
    # kernel keeps P and dS in fp32 registers; ours rounds them to bf16 a few times, which costs
    # at most 1.62x its error (80 seeds and shapes, diffuse and peaked attention): allow 2x, and
    # 2^-7 overall. Diffuse rows (small logits) are where an unsplit exponent would cost ~4x.
    torch.manual_seed(3)
    q, k, v = (_heads(2, h, 45, 32, torch.bfloat16, scale=spread) for h in (6, 2, 2))
    grad = torch.randn(2, 6, 45, 32).bfloat16()
    out = ops.attention(q, k, v, causal=causal)
    ref = _sdpa(q, k, v, causal)
    assert torch.equal(out, ref)
    truth = _reference_grads_fp64(q, k, v, grad, causal)
    ours = _grads(out, (q, k, v), grad)
    flash = _grads(ref, (q, k, v), grad)
    for o, f, t in zip(ours, flash, truth):
        assert o.dtype == torch.bfloat16
        err = ((o.double() - t).norm() / t.norm()).item()
        flash_err = ((f.double() - t).norm() / t.norm()).item()
        assert err <= 2 * flash_err and err < 2**-7, (err, flash_err)


def test_attention_fp32_default_keeps_the_flash_backward(monkeypatch):
    monkeypatch.setattr(ops, "_MATMUL_BACKWARD_DTYPES", (torch.bfloat16, torch.float16))
    torch.manual_seed(10)
    q, k, v = _heads(2, 6, 19, 8), _heads(2, 2, 19, 8), _heads(2, 2, 19, 8)
    grad = torch.randn(2, 6, 19, 8)
    ours = _grads(ops.attention(q, k, v), (q, k, v), grad)
    for o, t in zip(ours, _grads(_sdpa(q, k, v, True), (q, k, v), grad)):
        assert torch.equal(o, t)


def test_attention_under_autocast_and_without_grad():
    torch.manual_seed(4)
    q, k, v = _heads(2, 6, 16, 8), _heads(2, 2, 16, 8), _heads(2, 2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ops.attention(q, k, v), _sdpa(q, k, v, True)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and k.grad is not None and v.grad is not None
    with torch.no_grad():  # inference goes straight to SDPA
        assert torch.equal(ops.attention(q, k, v), _sdpa(q, k, v, True))


def _plain_rms(x, weight, eps=1e-5):
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight = weight
    return norm(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable", "frozen"])
def test_rms_norm_matches_model(dtype, trainable):
    torch.manual_seed(5)
    x = (torch.randn(3, 7, 48) * 3).to(dtype).requires_grad_()
    weight = torch.nn.Parameter(torch.randn(48), requires_grad=trainable)
    grad = torch.randn(3, 7, 48)
    out, ref = ops.rms_norm(x, weight, 1e-5), _plain_rms(x, weight)
    assert out.dtype == ref.dtype == torch.float32 and torch.equal(out, ref)
    inputs = (x, weight) if trainable else (x,)
    ours, theirs = _grads(out, inputs, grad), _grads(ref, inputs, grad)
    # fp32: same math, another order of the row reduction. bf16: both compute in fp32 and round the
    # result to bf16 once, so they differ by at most an ulp (assert_close's bf16 default, 2 ulps).
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype
        torch.testing.assert_close(o, t, **tol)


def test_rms_norm_input_without_grad():
    # LoRA's first norm sees frozen embeddings: only the weight's gradient is computed
    torch.manual_seed(9)
    x, weight, grad = torch.randn(2, 5, 16), torch.nn.Parameter(torch.randn(16)), torch.randn(2, 5, 16)
    out, ref = ops.rms_norm(x, weight, 1e-6), _plain_rms(x, weight, 1e-6)
    assert torch.equal(out, ref)
    torch.testing.assert_close(_grads(out, (weight,), grad)[0], _grads(ref, (weight,), grad)[0],
                               atol=1e-5, rtol=1e-5)


def test_rms_norm_bf16_output_feeds_autocast_linear_identically():
    torch.manual_seed(6)
    x = torch.randn(4, 9, 32, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(32))
    linear = torch.nn.Linear(32, 16)
    grad = torch.randn(4, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = ops.rms_norm(x, weight, 1e-5, out_dtype=torch.bfloat16)
        out, ref = linear(normed), linear(_plain_rms(x, weight))
    assert normed.dtype == torch.bfloat16 and torch.equal(out, ref)
    ours, theirs = _grads(out, (x, weight), grad), _grads(ref, (x, weight), grad)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_matches_plain_bitwise(dtype):
    torch.manual_seed(7)
    gate, up = (torch.randn(2, 5, 64).to(dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(2, 5, 64).to(dtype)
    out, ref = ops.swiglu(gate, up), F.silu(gate) * up
    assert out.dtype == dtype and torch.equal(out, ref)
    for o, t in zip(_grads(out, (gate, up), grad), _grads(ref, (gate, up), grad)):
        assert torch.equal(o, t)  # backward uses the very ops plain autograd uses


def _saved(fn, *args):
    """Tensors fn keeps for backward, as (shape, dtype, data_ptr)."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def test_saved_tensors_are_only_what_is_promised():
    torch.manual_seed(8)
    gate, up = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    out, saved = _saved(ops.swiglu, gate, up)
    assert saved == [((4, 64), torch.float32, gate.data_ptr()), ((4, 64), torch.float32, up.data_ptr())]
    _, plain = _saved(lambda g, u: F.silu(g) * u, gate, up)
    assert len(plain) == 3  # gate, silu(gate), up: one tensor more

    x, weight = torch.randn(2, 3, 32, requires_grad=True), torch.nn.Parameter(torch.ones(32))
    out, saved = _saved(lambda x, w: ops.rms_norm(x, w, 1e-5, torch.bfloat16), x, weight)
    # x itself, rstd (one fp32 value per row) and the weight itself: no new full-size tensor
    assert saved == [((2, 3, 32), torch.float32, x.data_ptr()), ((2, 3, 1), torch.float32, saved[1][2]),
                     ((32,), torch.float32, weight.data_ptr())]

    q, k, v = _heads(2, 6, 10, 8), _heads(2, 2, 10, 8), _heads(2, 2, 10, 8)
    out, saved = _saved(ops.attention, q, k, v)
    assert saved[:4] == [(tuple(t.shape), t.dtype, t.data_ptr()) for t in (q, k, v, out)]
    assert saved[4][:2] == ((2, 6, 10), torch.float32)  # log-sum-exp, one value per query row
    assert len(saved) == 5
