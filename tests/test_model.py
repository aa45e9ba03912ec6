"""The transformer itself: sizes, initialisation, training signal, GQA, context limit."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pocketlm.errors import UserError
from pocketlm.model import CONFIGS, GPT, ModelConfig, get_config


def meta_parameters(name: str) -> int:
    with torch.device("meta"):
        return GPT(get_config(name)).num_parameters()


def gpt2_formula(cfg: ModelConfig) -> int:
    """GPT-2's parameter count by hand: per layer 12 d^2 + 13 d, plus embeddings and the final norm."""
    d = cfg.n_embd
    return cfg.vocab_size * d + cfg.block_size * d + cfg.n_layer * (12 * d * d + 13 * d) + 2 * d


def tiny_llama(**overrides) -> ModelConfig:
    base = ModelConfig(name="llama-test", family="llama", vocab_size=300, block_size=64, n_layer=2, n_head=4,
                       n_kv_head=2, n_embd=64, intermediate_size=96, bias=False, tie_embeddings=False,
                       tokenizer="gpt2")
    return replace(base, **overrides)


@pytest.mark.parametrize("name, expected", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168)])
def test_parameter_counts_match_openai_gpt2(name, expected):
    assert meta_parameters(name) == expected


def test_gpt2_tiny_is_small_and_counted_exactly():
    cfg = CONFIGS["gpt2-tiny"]
    count = meta_parameters("gpt2-tiny")
    assert count == gpt2_formula(cfg)
    assert count < 10_000_000
    # The tied lm_head counts once; untying adds exactly one vocab x width matrix.
    with torch.device("meta"):
        untied = GPT(replace(cfg, tie_embeddings=False)).num_parameters()
    assert untied - count == cfg.vocab_size * cfg.n_embd


def test_a_few_adamw_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT.from_name("gpt2-tiny", block_size=32)
    model.train()
    x = torch.randint(0, 1000, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    _, first = model(x, y)
    assert math.isclose(first.item(), math.log(50257), rel_tol=0.05)  # ~uniform at init
    for _ in range(6):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, last = model(x, y)
    assert last.item() < first.item() - 0.5


def test_padded_vocab_has_extra_rows_but_logits_keep_vocab_columns():
    torch.manual_seed(0)
    model = GPT.from_name("gpt2-tiny", padded_vocab_size=50304).eval()
    assert model.transformer.wte.weight.shape[0] == 50304
    x = torch.randint(0, 50257, (2, 7))
    logits, loss = model(x, x)
    assert logits.shape == (2, 7, 50257)
    assert torch.isfinite(loss)
    with torch.inference_mode():
        cached, _ = model(x, cache=model.new_cache(2, 16))
    assert cached.shape == (2, 1, 50257)


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = CONFIGS["gpt2-tiny"]
    model = GPT(cfg)
    residual = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in model.transformer.h:
        for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert w.std().item() == pytest.approx(residual, rel=0.1)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert torch.all(block.attn.c_attn.bias == 0)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_llama_gqa_equals_multi_head_attention_with_repeated_kv_weights():
    """Grouped-query attention must mean: each KV head serves n_head / n_kv_head query heads."""
    torch.manual_seed(0)
    gqa = GPT(tiny_llama()).eval()
    mha = GPT(tiny_llama(n_kv_head=4)).eval()
    state = gqa.state_dict()
    hd, group = 64 // 4, 2
    for name, t in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # (kv_heads * hd, d) -> every KV head repeated for its group of query heads
            state[name] = t.view(2, hd, -1).repeat_interleave(group, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(state)
    assert gqa.transformer.h[0].attn.k_proj.weight.shape == (2 * hd, 64)
    x = torch.randint(0, 300, (2, 11))
    with torch.inference_mode():
        a, _ = gqa(x)
        b, _ = mha(x)
    assert a.shape == (2, 11, 300)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # And GQA is not a no-op: a model whose KV heads differ gives different logits.
    assert not torch.allclose(a, GPT(tiny_llama()).eval()(x)[0], atol=1e-3)


def test_sequences_longer_than_the_context_are_a_user_error():
    model = GPT.from_name("gpt2-tiny", block_size=16).eval()
    with pytest.raises(UserError, match="longer than the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly the context is fine
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        model(torch.zeros(1, 12, dtype=torch.long), cache=cache)
        with pytest.raises(UserError, match="longer than"):
            model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
