"""Generation scoring, the sonnet prompt builder, forgetting and the training-time metrics."""

from __future__ import annotations

import json

import pytest
import sacrebleu
import torch

from pocketlm.errors import UserError
from pocketlm.eval.during_training import evaluate_during_training
from pocketlm.eval.forgetting import compare, run_probes
from pocketlm.eval.forms.sonnet import sonnet_lines
from pocketlm.eval.generation_eval import (
    evaluate_generation,
    hypothesis,
    read_prompt_pairs,
    score_generations,
    sonnet_prompt_pairs,
    write_jsonl,
)
from pocketlm.generate import SamplingSettings, generate
from pocketlm.model import GPT, ModelConfig
from pocketlm.recipe import TrainConfig
from pocketlm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(5)
    cfg = ModelConfig(name="t", family="gpt2", vocab_size=50257, block_size=96, n_layer=2, n_head=2, n_embd=32)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def sonnet_rows(shared_data):
    d = shared_data / "sonnets"
    return sonnet_prompt_pairs(d / "sonnets_held_out_dev.txt", d / "TRUE_sonnets_held_out_dev.txt")


def test_sonnet_prompts_are_opening_lines_and_references_whole_sonnets(sonnet_rows):
    assert len(sonnet_rows) == 12
    assert [r["id"] for r in sonnet_rows] == list(range(132, 144))
    first = sonnet_rows[0]
    assert first["prompt"] == ("Thine eyes I love, and they, as pitying me,\nKnowing thy heart torment me with "
                               "disdain,\nHave put on black, and loving mourners be,\n")
    for row in sonnet_rows:
        assert len(sonnet_lines(row["reference"])) == 14
        assert row["reference"].startswith(row["prompt"])
        assert hypothesis(row["prompt"], "X", row["reference"]) == row["prompt"] + "X"  # auto: whole sonnet


def test_sonnet_prompt_builder_refuses_mismatched_files(shared_data, tmp_path):
    d = shared_data / "sonnets"
    with pytest.raises(UserError, match="not in"):
        sonnet_prompt_pairs(d / "sonnets_held_out_dev.txt", d / "sonnets.txt")
    with pytest.raises(UserError, match="does not exist"):
        sonnet_prompt_pairs(tmp_path / "nope.txt", d / "TRUE_sonnets_held_out_dev.txt")


def test_hypothesis_modes():
    assert hypothesis("Q: 2+2?", " 4", "4") == " 4"  # reference does not start with the prompt
    assert hypothesis("Q", "A", "4", "prompt+completion") == "QA"
    assert hypothesis("Q", "A", "QA", "completion") == "A"
    with pytest.raises(UserError):
        hypothesis("Q", "A", "QA", "both")


def test_generation_scores_equal_sacrebleu_and_keep_every_generation(model, tok, sonnet_rows, tmp_path):
    rows = sonnet_rows[:3]
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    metrics, gens = evaluate_generation(model, tok, rows, settings, form="sonnet", bleu=True)
    assert [g["id"] for g in gens] == [132, 133, 134]
    for g, row in zip(gens, rows):
        assert g["completion"] == generate(model, tok, row["prompt"], settings)[0]  # greedy: reproducible
        assert g["hypothesis"] == row["prompt"] + g["completion"]
        assert g["chrf"] == pytest.approx(sacrebleu.sentence_chrf(g["hypothesis"], [row["reference"]]).score)
        assert g["form"]["name"] == "sonnet" and g["form"]["passed"] is False  # 3 lines + 12 tokens
    hyps, refs = [g["hypothesis"] for g in gens], [r["reference"] for r in rows]
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert metrics["form_pass_rate"] == 0.0 and metrics["generations"] == 3
    assert {"distinct_1", "distinct_2", "repeated_4gram_rate"} <= set(metrics)
    write_jsonl(tmp_path / "p.jsonl", rows)
    assert read_prompt_pairs(tmp_path / "p.jsonl") == rows


def test_form_pass_rate_of_generations_uses_the_first_sample():
    rows = [{"completion": ">be me\n>eval\n\nnot greentext", "hypothesis": ">be me\n>eval\n\nnot greentext"},
            {"completion": "plain", "hypothesis": "plain"}]
    metrics = score_generations(rows, form="greentext")
    assert metrics["form_pass_rate"] == 0.5 and "chrf" not in metrics  # no references: no chrF


def test_prompt_files_are_checked(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UserError, match="reference"):
        read_prompt_pairs(bad)
    assert read_prompt_pairs(bad, require_reference=False) == [{"prompt": "x"}]
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        read_prompt_pairs(bad)


def test_forgetting_compares_before_and_after(model, tok):
    diff = compare({"loss": 2.0, "acc": 0.5, "note": "x"}, {"loss": 2.5, "acc": 0.25})
    assert diff["loss"] == {"before": 2.0, "after": 2.5, "delta": 0.5, "worse": True}
    assert diff["acc"]["delta"] == -0.25 and diff["acc"]["worse"] and "note" not in diff
    assert compare({"acc": 0.5}, {"acc": 0.75})["acc"]["worse"] is False
    # An adapted model that is the base plus noise on its output layer: same probe, measured drift.
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
    adapted = GPT(model.config).eval()
    adapted.load_state_dict(model.state_dict())
    with torch.no_grad():
        adapted.transformer.ln_f.weight.mul_(3.0)
    before = run_probes(model, tok, text=text, context=32)
    after = run_probes(adapted, tok, text=text, context=32)
    diff = compare(before, after)
    assert diff["loss"]["delta"] == pytest.approx(after["loss"] - before["loss"])
    assert set(diff) == {"loss", "perplexity", "bits_per_byte"}


def test_evaluate_during_training_is_greedy_and_restores_training_mode(model, tok, sonnet_rows, tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, sonnet_rows[:2] + [{"prompt": "x " * 200, "reference": "too long: skipped"}])
    cfg = TrainConfig(eval_prompts=str(path), eval_form="sonnet", eval_max_new_tokens=8)
    model.train()
    first = evaluate_during_training(model, tok, cfg)
    assert model.training  # the loop's mode is left as it was
    model.eval()
    assert set(first) == {"chrf", "form_pass_rate", "distinct_1", "distinct_2", "repeated_4gram_rate"}
    assert first == evaluate_during_training(model, tok, cfg)  # greedy: the same numbers every time
    assert first["form_pass_rate"] == 0.0
    assert evaluate_during_training(model, tok, TrainConfig()) == {}
