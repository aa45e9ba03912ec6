"""QLoRA: NF4 quantization, a 4-bit base under full-precision adapters, quality vs LoRA, save/load/merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm import lora
from pocketlm.cli import main
from pocketlm.io import load_model, peft, save_model
from pocketlm.model import GPT, ModelConfig
from pocketlm.quant import NF4_LEVELS, NF4Linear, dequantize_nf4, quantize_nf4, quantized_bytes
from pocketlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(n_embd: int = 64, vocab_size: int = 50257) -> GPT:
    return GPT(ModelConfig(name="tiny-llama", family="llama", vocab_size=vocab_size, n_layer=2, n_head=4,
                           n_kv_head=2, n_embd=n_embd, intermediate_size=128, bias=False, tie_embeddings=True,
                           block_size=64))


def test_nf4_picks_the_nearest_level_per_block_and_packs_two_per_byte():
    torch.manual_seed(0)
    w = torch.randn(37, 50) * torch.linspace(0.1, 3, 50)  # 1850 values: not a whole number of 64-blocks
    packed, absmax = quantize_nf4(w)
    assert packed.dtype == torch.uint8 and packed.numel() == 29 * 64 // 2 and absmax.numel() == 29
    back = dequantize_nf4(packed, absmax, w.shape)
    assert back.shape == w.shape and back.dtype == torch.float32

    # Brute force: every value is the level nearest to value / block absmax, times the absmax.
    flat = torch.cat([w.flatten(), torch.zeros(29 * 64 - 1850)]).view(29, 64)
    levels = torch.tensor(NF4_LEVELS)
    scaled = flat / flat.abs().amax(1, keepdim=True)
    codes = (scaled[..., None] - levels).abs().argmin(-1)
    expected = (levels[codes] * flat.abs().amax(1, keepdim=True)).flatten()[:1850].view(w.shape)
    torch.testing.assert_close(back, expected, rtol=0, atol=1e-6)
    assert set(codes.flatten().tolist()) == set(range(16))  # all 16 levels in use
    # The largest magnitude of each block is exact (it maps to level +-1).
    blocks = w.flatten()[:28 * 64].view(28, 64)
    i = blocks.abs().argmax(1)
    assert torch.equal(back.flatten()[:28 * 64].view(28, 64).gather(1, i[:, None]), blocks.gather(1, i[:, None]))
    assert (back - w).abs().max() <= 0.17 * w.abs().max()  # widest half-gap between levels is 0.152


def test_nf4_linear_dequantizes_on_the_fly_and_is_7x_smaller():
    torch.manual_seed(0)
    linear = nn.Linear(256, 192)
    q = NF4Linear.from_linear(linear)
    x = torch.randn(3, 256)
    weight = dequantize_nf4(q.weight_packed, q.weight_absmax, (192, 256))
    torch.testing.assert_close(q(x), F.linear(x, weight, linear.bias))
    assert quantized_bytes(q) - 192 * 4 < (256 * 192 * 4) / 7  # 0.5625 bytes per weight instead of 4
    assert not any(p.requires_grad for p in q.parameters())
    assert isinstance(q.dequantize(), nn.Linear) and torch.equal(q.dequantize().weight, weight)


def test_qlora_holds_every_block_linear_in_nf4_and_trains_adapters_only():
    torch.manual_seed(0)
    model = tiny_llama()
    plain_bytes = quantized_bytes(model.transformer.h)
    info = lora.prepare_model(model, "qlora", 4, 8, 0.0, "attn")
    linears = lora.block_linears(model)
    assert len(linears) == 14 and not any(isinstance(m, nn.Linear) for m in linears.values())
    assert {n for n, m in linears.items() if isinstance(m, lora.LoraLinear)} == set(info["targets"])
    assert all(isinstance(m.base_layer, NF4Linear) for m in lora.lora_modules(model).values())
    assert quantized_bytes(model.transformer.h) < 0.25 * plain_bytes
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{t}.{w}" for t in info["targets"] for w in ("lora_A", "lora_B")}

    # With B = 0 the QLoRA model is the dequantized base; merging gives exactly that plain model.
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits = model(idx)[0]
        merged = lora.merge_lora(copy.deepcopy(model))
        assert not any(isinstance(m, (NF4Linear, lora.LoraLinear)) for m in merged.modules())
        torch.testing.assert_close(merged(idx)[0], logits, rtol=0, atol=1e-5)


def _permutation_batch(step: int, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that follow a fixed random permutation of 128 tokens: a task LoRA must learn."""
    seq = [torch.randint(0, 128, (8, 1), generator=torch.Generator().manual_seed(step))]
    for _ in range(32):
        seq.append(perm[seq[-1]])
    s = torch.cat(seq, 1)
    return s[:, :-1], s[:, 1:]


def test_qlora_learns_as_well_as_lora_with_a_quarter_of_the_memory():
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = tiny_llama(vocab_size=128)
    results = {}
    for method in ("lora", "qlora"):
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the same A initialisation for both
        lora.prepare_model(model, method, 8, 16, 0.0, "all-linear")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(40):
            _, loss = model(*_permutation_batch(step, perm))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        results[method] = (losses[0], sum(losses[-3:]) / 3, quantized_bytes(model.transformer.h))
    (l0, l1, lora_bytes), (q0, q1, qlora_bytes) = results["lora"], results["qlora"]
    assert l1 < l0 - 0.5 and q1 < q0 - 0.5  # both learn
    assert abs(q1 - l1) < 0.02 * l1  # a 4-bit base, the same quality on this task
    assert qlora_bytes < 0.3 * lora_bytes  # blocks: NF4 base + fp32 adapters vs fp32 base + adapters


def test_qlora_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = tiny_llama()
    lora.prepare_model(model, "qlora", 4, 8, 0.0, "all-linear")
    for m in lora.lora_modules(model).values():
        nn.init.normal_(m.lora_B, std=0.05)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        model.zero_grad()
    assert torch.isfinite(grads["bf16"]).all()
    assert F.cosine_similarity(grads["fp32"], grads["bf16"], dim=0) > 0.98


def test_qlora_adapter_reloads_exactly_and_merges(tmp_path):
    torch.manual_seed(0)
    base = save_model(tiny_llama(), load_tokenizer("gpt2"), tmp_path / "base")
    model, _ = load_model(base)
    lora.prepare_model(model, "qlora", 4, 8, 0.0, "attn+mlp", base=base)
    for m in lora.lora_modules(model).values():
        nn.init.normal_(m.lora_B, std=0.1)
    peft.LoraSaver(base=base).save(model, None, tmp_path / "step")
    sidecar = json.loads((tmp_path / "step" / "adapter" / "pocketlm_adapter.json").read_text())
    assert sidecar["method"] == "qlora" and sidecar["quantization"] == {"type": "nf4", "block_size": 64}

    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        expected = model(idx)[0]
        reloaded, _ = load_model(tmp_path / "step" / "adapter")
        assert torch.equal(reloaded(idx)[0], expected)  # the same NF4 base, rebuilt from the fp32 base

    from transformers import AutoModelForCausalLM

    main(["merge", str(tmp_path / "step"), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (merged(idx).logits - expected).abs().max() < 1e-4
        plain, _ = load_model(base)  # the merge used the dequantized base, not the original fp32 one
        assert (plain(idx)[0] - expected).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [0, -1])
def test_qlora_bad_rank_is_a_user_error(bad):
    from pocketlm.errors import UserError

    with pytest.raises(UserError, match="rank"):
        lora.prepare_model(tiny_llama(32), "qlora", bad, 8, 0.0, "attn")
