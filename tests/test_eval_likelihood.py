"""Loss / perplexity / bits per byte: known values, sliding windows, prepared splits."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from pocketlm.errors import UserError
from pocketlm.eval.likelihood import (
    evaluate_split,
    evaluate_text,
    load_split_tokens,
    score_tokens,
    sliding_windows,
)
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import load_tokenizer

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do "
        "shake the darling buds of May, and summer's lease hath all too short a date. Café, naïve — ünïcödé.")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def small_gpt(block_size: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(name="t", family="gpt2", vocab_size=50257, block_size=block_size, n_layer=2, n_head=2,
                      n_embd=32, tie_embeddings=False)
    return GPT(cfg).eval()


def uniform_gpt() -> GPT:
    """Zero output weights: every next token has probability 1/50257."""
    model = small_gpt()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_uniform_model_has_perplexity_vocab_size_and_known_bits_per_byte(tok):
    result = evaluate_text(uniform_gpt(), tok, TEXT, context=16, stride=5)
    n_tokens = len(tok.encode(TEXT))
    assert result.tokens == n_tokens  # every token scored once (the end-of-text start token is context only)
    assert result.perplexity == pytest.approx(50257, rel=1e-5)
    assert result.loss == pytest.approx(math.log(50257), rel=1e-6)
    n_bytes = len(TEXT.encode("utf-8"))
    assert result.bytes == n_bytes and n_bytes > len(TEXT)  # bytes, not characters
    assert result.bits_per_byte == pytest.approx(n_tokens * math.log2(50257) / n_bytes, rel=1e-6)


def test_single_window_equals_a_manual_forward_pass(tok):
    model = small_gpt()
    ids = tok.encode(TEXT)
    seq = torch.tensor([[tok.eos_id] + ids])
    with torch.no_grad():
        logits, _ = model(seq[:, :-1])
    manual = F.cross_entropy(logits[0], seq[0, 1:]).item()
    result = evaluate_text(model, tok, TEXT, context=64)
    assert result.windows == 1
    assert result.loss == pytest.approx(manual, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(manual), rel=1e-5)


@pytest.mark.parametrize("context,stride", [(8, 1), (8, 3), (8, 8), (13, 6)])
def test_sliding_windows_score_each_token_once(context, stride):
    for n in [1, 5, 8, 9, 31, 64]:
        windows = sliding_windows(n, context, stride)
        counted = []
        for begin, end, n_scored in windows:
            assert end - begin <= context
            assert 1 <= n_scored <= end - begin
            counted += list(range(end - n_scored + 1, end + 1))  # targets are positions begin+1..end
        assert counted == list(range(1, n + 1))
        # After the first window every scored token sees at least context - stride earlier tokens.
        for begin, end, n_scored in windows[1:]:
            assert (end - n_scored + 1) - begin >= context - stride


def test_sliding_window_nll_equals_per_token_recomputation(tok):
    """stride 3, context 8: token t's loss is the model's loss for t given exactly its window's prefix."""
    model = small_gpt()
    ids = tok.encode(TEXT)[:30]
    seq = [tok.eos_id] + ids
    nll, n_windows = score_tokens(model, ids, prefix=tok.eos_id, context=8, stride=3, batch_size=2)
    assert nll.numel() == len(ids) and n_windows == len(sliding_windows(len(ids), 8, 3))
    expected = torch.empty(len(ids), dtype=torch.float64)
    for begin, end, n_scored in sliding_windows(len(ids), 8, 3):
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq[begin:end]]))
        for pos in range(end - n_scored, end):  # logits index pos - begin predicts seq[pos + 1]
            expected[pos] = F.cross_entropy(logits[0, pos - begin][None], torch.tensor([seq[pos + 1]])).item()
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)


def test_smaller_stride_gives_more_context_and_batch_size_does_not_matter(tok):
    model = small_gpt()
    a = evaluate_text(model, tok, TEXT, context=16, stride=16, batch_size=1)
    b = evaluate_text(model, tok, TEXT, context=16, stride=16, batch_size=7)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.tokens == b.tokens
    c = evaluate_text(model, tok, TEXT, context=16, stride=4)
    assert c.tokens == a.tokens and c.windows > a.windows


def test_bad_window_settings_and_contexts_are_user_errors(tok):
    model = small_gpt(block_size=32)
    with pytest.raises(UserError, match="stride"):
        evaluate_text(model, tok, TEXT, context=8, stride=9)
    with pytest.raises(UserError, match="context of 32"):
        evaluate_text(model, tok, TEXT, context=64)


def test_max_tokens_scores_a_prefix(tok):
    result = evaluate_text(uniform_gpt(), tok, TEXT, context=16, max_tokens=10)
    assert result.tokens == 10
    assert result.bytes == len(tok.decode(tok.encode(TEXT)[:10]).encode("utf-8"))


def test_prepared_split_is_scored_as_one_stream(tiny_data, tok):
    model = small_gpt()
    tokens, manifest = load_split_tokens(tiny_data, "val")
    assert len(tokens) == manifest["splits"]["val"]["tokens"]
    result = evaluate_split(model, tok, tiny_data, "val", context=32, stride=32, max_tokens=200)
    assert result.tokens == 200
    nll, _ = score_tokens(model, tokens[:200], prefix=manifest["eot_id"], context=32, stride=32)
    assert result.loss == pytest.approx(float(nll.mean()), rel=1e-6)
    text = tok.decode([t for t in tokens[:200].tolist() if t != manifest["eot_id"]])
    assert result.bytes == len(text.encode("utf-8"))


def test_split_made_with_another_tokenizer_is_refused(tiny_data, tmp_path, tok):
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["identity"] = "sha256:" + "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="different tokenizer"):
        evaluate_split(small_gpt(), tok, other, "val", context=32, max_tokens=50)
    with pytest.raises(UserError, match="split 'test'|no split 'test'"):
        evaluate_split(small_gpt(), tok, tiny_data, "test", context=32)


def _llama(padded: int | None = None) -> GPT:
    torch.manual_seed(1)
    cfg = ModelConfig(name="t", family="llama", vocab_size=300, padded_vocab_size=padded, block_size=32, n_layer=2,
                      n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, bias=False, tie_embeddings=True)
    return GPT(cfg).eval()


class _WrappedHead(torch.nn.Module):  # a head that is not a plain nn.Linear (as LoRA or a quantized head is)
    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear
        self.rows = 0

    def forward(self, x):
        self.rows += x.reshape(-1, x.shape[-1]).shape[0]
        return self.linear(x)


@pytest.mark.parametrize("kind", ["gpt2", "llama-padded", "bf16-weights", "bf16-autocast", "wrapped-head"])
def test_per_token_losses_equal_cross_entropy_of_the_logits_and_skip_unscored_rows(kind, monkeypatch):
    """forward(reduction="none"): each scored target's cross-entropy as F.cross_entropy of the full
    logits gives it, in chunks (here of 5 or 20 rows, so several), the head only on the scored positions."""
    import pocketlm.model as model_module

    monkeypatch.setattr(model_module, "_SCORE_ROWS", 5)
    model = small_gpt() if kind == "gpt2" else _llama(320 if kind == "llama-padded" else None)
    if kind == "bf16-weights":
        model.to(torch.bfloat16)
    if kind == "wrapped-head":
        model.lm_head = _WrappedHead(model.lm_head)
    vocab = model.config.vocab_size
    torch.manual_seed(2)
    x = torch.randint(0, vocab, (3, 12))
    targets = torch.randint(0, vocab, (3, 12))
    targets[0, :4] = -100  # context only
    targets[2, :11] = -100
    scored = targets != -100
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "bf16-autocast")
    with torch.no_grad(), autocast:
        logits, _ = model(x)
        _, nll = model(x, targets, return_logits=False, reduction="none")
        mean = model(x, targets, return_logits=False)[1]
    assert logits.shape[-1] == vocab and nll.shape == targets.shape and nll.dtype == torch.float32
    expected = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(3, 12)
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    assert (nll[~scored] == 0).all() and (nll[scored] > 0).all()
    torch.testing.assert_close(nll[scored].mean(), mean.float(), rtol=2e-3, atol=2e-3)  # the training loss too
    if kind == "wrapped-head":
        model.lm_head.rows = 0
        with torch.no_grad():
            model(x, targets, return_logits=False, reduction="none")
        assert model.lm_head.rows == int(scored.sum())
    else:  # the plain head: one (rows x vocab) matmul per chunk of scored positions, nothing more
        from torch.utils._python_dispatch import TorchDispatchMode

        class HeadRows(TorchDispatchMode):
            rows: list[int] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is torch.ops.aten.mm.out and out.shape[-1] == vocab:
                    self.rows.append(out.shape[0])
                return out

        with torch.no_grad(), autocast, HeadRows() as seen:
            model(x, targets, return_logits=False, reduction="none")
        assert sum(seen.rows) == int(scored.sum()) and len(seen.rows) > 1


def test_scoring_runs_the_head_only_on_scored_tokens(tok):
    """Windows that overlap (stride < context) score their last `stride` tokens: the head sees only those."""
    model = small_gpt()
    model.lm_head = _WrappedHead(model.lm_head)
    ids = tok.encode(TEXT)[:40]
    nll, _ = score_tokens(model, ids, prefix=tok.eos_id, context=16, stride=4, batch_size=3)
    assert model.lm_head.rows == len(ids) == nll.numel()  # each token through the head once, not 16 / 4 times
