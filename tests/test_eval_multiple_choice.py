"""Multiple choice (HellaSwag format): lm-eval's tokenisation and scoring, checked by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pocketlm.errors import UserError
from pocketlm.eval.multiple_choice import (
    Item,
    continuation_logprobs,
    encode_pair,
    evaluate_multiple_choice,
    read_multiple_choice,
)
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(3)
    cfg = ModelConfig(name="t", family="gpt2", vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32,
                      tie_embeddings=False)
    return GPT(cfg).eval()


ITEMS = [
    Item("A man is sitting on a roof. he", ["is using wrap to wrap skis.", "starts pulling up roofing.",
                                            "is holding a cube.", "jumps."], 1),
    Item("A lady walks to a barbell. She", ["lifts it.", "bends down and grabs the pole.", "sings", "x"], 0),
]


def hand_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) from one unpadded forward pass, token by token."""
    seq = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits, _ = model(seq[:, :-1])
    logp = logits[0].log_softmax(-1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_encode_pair_moves_trailing_space_into_the_continuation(tok):
    ctx, cont = encode_pair(tok, "The cat ", "sat.")
    assert ctx == tok.encode("The cat")
    assert tok.decode(cont) == " sat."
    whole = tok.encode("The cat sat.")
    assert ctx + cont == whole


def test_batched_padded_scores_equal_hand_computation(model, tok):
    requests = []
    for item in ITEMS:
        for ending in item.endings:
            requests.append(encode_pair(tok, item.context, " " + ending))
    batched = continuation_logprobs(model, requests, batch_size=3)  # rows of different lengths, padded
    for (ctx, cont), got in zip(requests, batched):
        assert got == pytest.approx(hand_logprob(model, ctx, cont), rel=1e-4, abs=1e-4)


def test_acc_is_summed_logprob_and_acc_norm_divides_by_ending_bytes(model, tok):
    result = evaluate_multiple_choice(model, tok, ITEMS, batch_size=4)
    assert result["items"] == 2
    correct = correct_norm = 0
    for item, detail in zip(ITEMS, result["details"]):
        lls = [hand_logprob(model, *encode_pair(tok, item.context, " " + e)) for e in item.endings]
        assert detail["logprobs"] == pytest.approx(lls, rel=1e-4, abs=1e-4)
        pred = max(range(4), key=lambda k: lls[k])
        pred_norm = max(range(4), key=lambda k: lls[k] / len(item.endings[k].encode("utf-8")))
        assert (detail["pred"], detail["pred_norm"]) == (pred, pred_norm)
        correct += pred == item.label
        correct_norm += pred_norm == item.label
    assert result["acc"] == correct / 2 and result["acc_norm"] == correct_norm / 2


def test_uniform_model_acc_prefers_fewest_tokens_acc_norm_fewest_tokens_per_byte(tok):
    """With every token at probability 1/V, log p(ending) = -n_tokens * ln V: acc picks the ending with the
    fewest tokens, acc_norm the one with the fewest tokens per byte."""
    cfg = ModelConfig(name="u", family="gpt2", vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16,
                      tie_embeddings=False)
    uniform = GPT(cfg).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    endings = ["zq", "the the the the the the the the"]  # 1 vs 8 tokens; 2 bytes vs 31 bytes
    item = Item("It was", endings, 1)
    result = evaluate_multiple_choice(uniform, tok, [item])
    n_tokens = [len(encode_pair(tok, "It was", " " + e)[1]) for e in endings]
    lls = [-n * math.log(50257) for n in n_tokens]
    assert result["details"][0]["logprobs"] == pytest.approx(lls, rel=1e-5)
    assert result["details"][0]["pred"] == 0  # fewer tokens
    per_byte = [ll / len(e) for ll, e in zip(lls, endings)]
    assert result["details"][0]["pred_norm"] == max(range(2), key=lambda k: per_byte[k]) == 1
    assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)


def test_long_items_are_cut_from_the_left_to_the_context(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(name="s", family="gpt2", vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16)
    short = GPT(cfg).eval()
    item = Item("word " * 40, ["one two three", "four"], 0)
    result = evaluate_multiple_choice(short, tok, [item])  # would raise if the input exceeded 16 tokens
    ctx, cont = encode_pair(tok, item.context, " one two three")
    assert result["details"][0]["logprobs"][0] == pytest.approx(hand_logprob(short, ctx[-(16 + 1 - len(cont)):],
                                                                             cont), rel=1e-4)


def test_reads_hellaswag_and_limit(shared_data, tok, model):
    items = read_multiple_choice(shared_data / "hellaswag" / "hellaswag_val.jsonl", limit=3)
    assert len(items) == 3 and items[0].context.startswith("Roof shingle removal:") and items[0].label == 3
    assert all(len(i.endings) == 4 for i in items)
    result = evaluate_multiple_choice(model, tok, items)
    assert result["items"] == 3 and 0 <= result["acc"] <= 1


@pytest.mark.parametrize("row,message", [
    ({"ctx": "a", "endings": ["b"], "label": 3}, "not an index"),
    ({"ctx": "a", "endings": ["b"]}, "integer `label`"),
    ({"ctx": "a", "endings": "b", "label": 0}, "list of strings"),
])
def test_bad_items_are_user_errors(tmp_path, row, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message):
        read_multiple_choice(path)
    with pytest.raises(UserError, match="does not exist"):
        read_multiple_choice(tmp_path / "missing.jsonl")
