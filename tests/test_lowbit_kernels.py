"""pocketlm's low-bit decoding kernels (pocketlm/compress/lowbit.cpp) against a float64 reference of the same
arithmetic: activations rounded to int8 per 32 columns, weights as stored."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn as nn

from pocketlm.compress import formats as fm
from pocketlm.compress import kernels
from pocketlm.compress.modules import HEAD_EXACT_TOP, Int4Linear, Int8Linear, set_compute_dtype

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=kernels.status())


def test_kernels_build_wherever_the_cpu_and_a_compiler_allow():
    flags = kernels._cpu_flags()
    wanted = os.environ.get("POCKETLM_LOWBIT", "1") != "0"
    if wanted and all(f in flags for f in kernels.NEEDS) and shutil.which("g++"):
        assert kernels.available(), kernels.status()  # a build error must not pass for "unsupported"
    else:
        assert not kernels.available() and "PyTorch's kernels" in kernels.status()


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: int8 codes per 32 columns times their scale (amax / 127), in float64."""
    xb = x.double().view(x.shape[0], -1, 32)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scale > 0, xb * (127 / xb.abs().amax(-1, keepdim=True)), 0).round()
    return (codes * scale).view_as(x)


@needs_kernels
@pytest.mark.parametrize("kind", ["int8-32", "int8-64", "int8-row", "int4-sym", "int4-asym", "int4-128"])
@pytest.mark.parametrize("rows", [1, 3, 6])  # blocks of 4 rows and what is left over
def test_kernels_compute_the_stored_weights_times_int8_activations(kind, rows):
    torch.manual_seed(0)
    n, k = 200, 256  # 200 output rows: a last block of 8 of 16
    linear = nn.Linear(k, n, bias=False)
    x = torch.randn(rows, k) * torch.linspace(0.1, 3, k)  # columns of different scales
    x[0, :32] = 0  # an all-zero block of activations
    if kind.startswith("int8"):
        group = {"int8-32": 32, "int8-64": 64, "int8-row": None}[kind]
        layer = Int8Linear.from_linear(linear, group)
        got = torch.ops.pocketlm_lowbit.int8_mm(x, *kernels.int8_layout(layer.qweight, layer.scales), n)
    else:
        group, scheme = (128, "sym") if kind == "int4-128" else (32, kind.split("-")[1])
        layer = Int4Linear.from_linear(linear, group, scheme)
        layout = kernels.int4_layout(fm.unpack_int4(layer.qweight), layer.scales, layer.zeros)
        got = torch.ops.pocketlm_lowbit.int4_mm(x, *layout, n)
    want = quantized_activations(x) @ layer.dequantized_weight(torch.float64).t()
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)
    exact = x.double() @ layer.dequantized_weight(torch.float64).t()  # and the rounding costs little
    assert float((got.double() - exact).norm() / exact.norm()) < 0.02


@needs_kernels
def test_layers_decode_on_the_kernels_and_keep_pytorchs_fp32_path():
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(nn.Linear(128, 96), 32)
    x = torch.randn(1, 1, 128)
    op = torch.ops.pocketlm_lowbit.int8_mm(x.view(1, -1), *kernels.int8_layout(layer.qweight, layer.scales), 96)
    assert torch.equal(layer(x).view(1, -1), op + layer.bias)  # bf16 compute (the default): the kernels
    assert layer._lowbit is not None and layer._kernel is None
    set_compute_dtype(layer, torch.float32)  # fp32 compute: PyTorch's exact path
    ref = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_the_head_recomputes_its_top_logits_from_unrounded_activations():
    torch.manual_seed(2)
    head = Int8Linear.from_linear(nn.Linear(64, 512, bias=False), 32)
    head.exact_top = HEAD_EXACT_TOP
    x = torch.randn(2, 64)
    y = head(x)
    exact = x @ head.dequantized_weight().t()
    top = exact.topk(HEAD_EXACT_TOP // 4, dim=-1).indices  # well inside the 16 recomputed (the 16th may swap)
    torch.testing.assert_close(y.gather(-1, top), exact.gather(-1, top), atol=1e-5, rtol=1e-5)
    assert torch.equal(y.argmax(-1), exact.argmax(-1))


@needs_kernels
def test_layouts_pad_rows_to_blocks_of_16():
    q = torch.randint(-127, 128, (20, 64), dtype=torch.int8)
    w, s = kernels.int8_layout(q, torch.rand(20, 2))
    assert w.shape == (2, 16, 16, 4) and s.shape == (2, 2, 16)
    assert torch.equal(w[0, :, 3].to(torch.int16) - 128, q[3].view(16, 4))  # row 3's 64 codes, 4 at a time
    assert s[1, :, 4:].abs().sum() == 0  # padded rows weigh nothing
    codes = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    p, _, _ = kernels.int4_layout(codes, torch.rand(16, 2), None)
    assert p.shape == (1, 2, 4, 16, 4)
    assert torch.equal(p[0, 1, 2, 5] & 15, codes[5, 32 + 8:32 + 12])  # group 1, chunk 2, row 5: low nibbles
    assert torch.equal(p[0, 1, 2, 5] >> 4, codes[5, 32 + 24:32 + 28])  # ... and the second half's columns


@needs_kernels
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_projections_decode_together_as_they_would_alone(fmt):
    from pocketlm.compress.convert import quantize_model
    from pocketlm.compress.modules import decode_together
    from pocketlm.model import GPT, ModelConfig

    torch.manual_seed(3)
    cfg = ModelConfig(name="llama-test", family="llama", vocab_size=512, block_size=32, n_layer=1, n_head=4,
                      n_kv_head=2, n_embd=64, intermediate_size=96, bias=False, tie_embeddings=True,
                      tokenizer="gpt2")
    model = GPT(cfg).eval()
    quantize_model(model, fm.QuantSpec(fmt), progress=False)
    attn, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    assert attn.project_together is decode_together and mlp.project_together is decode_together
    x = torch.randn(1, 2, 64)
    for layers in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        together = decode_together(x, layers)
        alone = [m(x) for m in layers]
        assert layers[0]._stacked is not None  # one kernel call on the stacked layout
        for a, b in zip(together, alone):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert decode_together(torch.randn(1, 40, 64), layers) is None  # a prefill: each layer alone
    idx = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hooked = model(idx)[0]
        attn.project_together = mlp.project_together = None
        torch.testing.assert_close(model(idx)[0], hooked)


def test_a_cache_that_cannot_be_written_falls_back_to_pytorchs_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("POCKETLM_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
    (tmp_path / "a-file").write_text("not a folder")
    ok, why = kernels._load()
    assert not ok and ("build failed" in why or "lacks" in why or "no " in why or "off" in why), why
    assert not list(tmp_path.rglob("*.so"))
