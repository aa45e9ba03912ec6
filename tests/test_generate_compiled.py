"""The compiled decode step (generate --compile): the same tokens as the eager loop, with fixed shapes."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from pocketlm.cli import main
from pocketlm.compress import formats as fm
from pocketlm.compress import kernels
from pocketlm.compress.convert import quantize_model
from pocketlm.generate import SamplingSettings, compiled_step, generate_tokens
from pocketlm.kv_cache import StaticKVCache
from pocketlm.model import GPT, ModelConfig

GREEDY = SamplingSettings(max_new_tokens=6, temperature=0)


def tiny_llama(seed: int = 2, vocab: int = 512) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(name="llama-test", family="llama", vocab_size=vocab, block_size=64, n_layer=2, n_head=4,
                      n_kv_head=2, n_embd=64, intermediate_size=96, bias=False, tie_embeddings=True,
                      tokenizer="gpt2")
    return GPT(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_static_cache_step_equals_the_eager_step(family):
    """Eagerly (no compiler), the fixed-shape step gives the logits of the ordinary cached step."""
    torch.manual_seed(5)
    model = tiny_llama() if family == "llama" else GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=512,
                                                                  block_size=32)).eval()
    idx = torch.randint(0, 512, (2, 7))
    with torch.inference_mode():
        eager, static_src = model.new_cache(2, 12), model.new_cache(2, 12)
        model(idx, cache=eager)
        model(idx, cache=static_src)
        static = StaticKVCache(static_src)
        for _ in range(4):
            tok = torch.randint(0, 512, (2, 1))
            want = model(tok, cache=eager)[0]
            got = model(tok, cache=static)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert int(static.pos) == eager.pos == 11


@pytest.mark.parametrize("fmt", ["int8", "int4"])  # fp32: test_each_model_gets_its_own_graph
def test_compiled_decoding_gives_the_eager_tokens(fmt):
    model = tiny_llama()
    quantize_model(model, fm.QuantSpec(fmt), progress=False)
    compiled_step(model)  # kernel layouts are built before tracing, else every step would repack them
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "_lowbit")}
    if kernels.available():  # q/k/v and gate/up on stacked layouts (kept on q and gate), the others their own
        assert sum(m._stacked is not None for m in layers.values()) == 4
    shared = ("k_proj", "v_proj", "up_proj") if kernels.available() else ()
    assert all(m._kernel is not None or m._lowbit is not None or m._stacked is not None
               for n, m in layers.items() if not n.endswith(shared))
    idx = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    eager = generate_tokens(model, idx, GREEDY, eos_id=None)
    compiled = generate_tokens(model, idx, GREEDY, eos_id=None, compiled=True)
    assert torch.equal(compiled, eager)


def test_rows_that_end_early_keep_their_end_and_others_go_on():
    """Compiled, every row is fed each step (fixed shapes); ended rows stay ended, the others are unchanged."""
    model = tiny_llama(seed=3)
    idx = torch.randint(0, 512, (2, 4), generator=torch.Generator().manual_seed(1))
    solo = generate_tokens(model, idx[1:], replace(GREEDY, max_new_tokens=8), eos_id=None)[0]
    first = generate_tokens(model, idx[:1], replace(GREEDY, max_new_tokens=8), eos_id=None)[0]
    eos = int(first[1])  # row 0 ends at its second token
    if eos in solo.tolist():
        pytest.skip("the random model gave row 1 the same token")
    both = generate_tokens(model, idx, replace(GREEDY, max_new_tokens=8), eos_id=eos, compiled=True)
    assert both[0, :2].tolist() == first[:2].tolist() and set(both[0, 2:].tolist()) == {eos}
    assert both[1].tolist() == solo.tolist()


def test_each_model_gets_its_own_graph():
    """Module guards are skipped, so a graph must never serve another model, even one of the same shapes."""
    a = tiny_llama(seed=4)
    b = copy.deepcopy(a)  # the same shapes, other layers: a graph of a's would compute a's model
    quantize_model(b, fm.QuantSpec("int8"), progress=False)
    assert compiled_step(a) is compiled_step(a) and compiled_step(b) is not compiled_step(a)
    idx = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(2))
    for m in (a, b):
        assert torch.equal(generate_tokens(m, idx, GREEDY, eos_id=None, compiled=True),
                           generate_tokens(m, idx, GREEDY, eos_id=None))


def test_cli_generate_compile_reports_compile_time(tmp_path, capsys):
    from pocketlm.io import save_model
    from pocketlm.tokenizer import load_tokenizer

    folder = save_model(tiny_llama(vocab=50257), load_tokenizer("gpt2"), tmp_path / "m")
    out = tmp_path / "g.json"
    args = [str(folder), "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "5", "--json"]
    assert main(["generate", *args, str(out), "--compile"]) in (0, None)
    compiled = json.loads(out.read_text())
    assert main(["generate", *args, str(out)]) in (0, None)
    eager = json.loads(out.read_text())
    assert compiled["compiled"] and compiled["compile_seconds"] > 0 and not eager["compiled"]
    assert compiled["samples"] == eager["samples"]
    assert "tokens/s" in capsys.readouterr().err
