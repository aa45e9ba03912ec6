"""Zero-shot probes: the same likelihood scoring as multiple choice, calibration, verbalizers, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketlm.classify.data import read_labelled
from pocketlm.cli import main
from pocketlm.errors import UserError
from pocketlm.eval.multiple_choice import Item, evaluate_multiple_choice
from pocketlm.eval.zero_shot import PROBES, class_words, evaluate_zero_shot, get_probe
from pocketlm.io import save_model
from pocketlm.model import GPT, get_config
from pocketlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPT(get_config("gpt2-tiny")).eval(), load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def sst_rows(tmp_path_factory, shared_data):
    lines = (shared_data / "sst" / "ids-sst-dev.csv").read_text(encoding="utf-8").splitlines()[:41]
    path = tmp_path_factory.mktemp("sst") / "sst-40.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_zero_shot_scores_equal_multiple_choice_on_the_same_prompts(tiny_model, sst_rows):
    model, tok = tiny_model
    rows = read_labelled(sst_rows, "sentence", "sentiment").rows
    probe = get_probe("sentiment")
    result = evaluate_zero_shot(model, tok, rows, probe, batch_size=8)
    words = PROBES["sentiment"].verbalizers[5]
    items = [Item(probe.template.format(text=r.text, text_pair=""), words, int(r.label)) for r in rows]
    mc = evaluate_multiple_choice(model, tok, items, batch_size=8)
    assert result["accuracy"] == pytest.approx(mc["acc"])
    for ours, theirs in zip(result["details"], mc["details"]):
        assert ours["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-4)
        assert ours["pred"] == theirs["pred"]
    assert result["examples"] == 40 and 0 <= result["accuracy_calibrated"] <= 1
    counts = [sum(int(r.label) == c for r in rows) for c in range(5)]
    assert result["majority_accuracy"] == pytest.approx(max(counts) / 40)


def test_calibration_removes_a_words_prior(tiny_model, tmp_path):
    """A prompt that carries no information: raw scores always pick the same word; calibrated scores
    subtract exactly that prior, so every row's calibrated margin is zero and the first class wins."""
    model, tok = tiny_model
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "N/A", "label": y}) + "\n" for y in [0, 1, 1, 0]))
    rows = read_labelled(path, "text", "label").rows
    r = evaluate_zero_shot(model, tok, rows, get_probe("custom", "Q:{text} A:", ["no", "yes"]))
    assert {d["pred_calibrated"] for d in r["details"]} == {0}
    assert r["accuracy_calibrated"] == 0.5


def test_verbalizer_and_template_mistakes_are_user_errors():
    with pytest.raises(UserError, match="no words for"):
        class_words(get_probe("paraphrase"), [0, 1, 2])
    assert class_words(get_probe("sentiment"), ["neg", "pos"]) == ["negative", "positive"]
    assert class_words(get_probe("custom", "{text}"), ["neg", "pos"]) == ["neg", "pos"]
    with pytest.raises(UserError, match="needs --template"):
        get_probe("custom")
    with pytest.raises(UserError, match="unknown zero-shot probe"):
        get_probe("topic")


def test_cli_zero_shot_paraphrase_on_a_seeded_holdout(tmp_path, shared_data, tiny_model, capsys):
    model, tok = tiny_model
    folder = save_model(model, tok, tmp_path / "m")
    out = tmp_path / "zs.json"
    main(["eval", str(folder), "--zero-shot", "paraphrase", str(shared_data / "quora" / "quora-dev.csv"),
          "--holdout", "test", "--limit", "12", "--json", str(out)])
    report = json.loads(out.read_text())
    assert 0 <= report["accuracy"] <= 1 and report["zero_shot_examples"] == 12
    assert report["settings"]["holdout"] == "test"
    err = capsys.readouterr().err
    assert "test part (2,021 of 20,212 rows) of a seeded split" in err and "skipped 2 malformed rows" in err


@pytest.mark.parametrize("flags, message", [
    (["--zero-shot", "topic", "FILE"], "unknown zero-shot probe"),
    (["--zero-shot", "sentiment", "FILE", "--label-column", "stars"], "no column 'stars'"),
    (["--zero-shot", "sentiment", "missing.csv"], "does not exist"),
    (["--classify", "FILE", "--text", "FILE"], "--classify evaluates a classifier run alone"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, sst_rows, tiny_model, capsys, flags, message):
    model, tok = tiny_model
    folder = save_model(model, tok, tmp_path / "m")
    flags = [str(sst_rows) if f == "FILE" else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(folder), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("pocketlm eval: error:")


def test_shared_data_path_exists(shared_data):
    assert Path(shared_data / "quora" / "quora-dev.csv").is_file()


def test_typed_backslash_n_in_a_template_is_a_newline_and_samples_keep_all_classes():
    from pocketlm.classify.data import Row
    from pocketlm.eval.zero_shot import probe_classes

    assert get_probe("custom", "Review:{text}\\nSentiment:").template == "Review:{text}\nSentiment:"
    rows = [Row("a", 0), Row("b", 4), Row("c", 2)]  # a sample of SST-5 without classes 1 and 3
    assert probe_classes(get_probe("sentiment"), rows) == [0, 1, 2, 3, 4]
    assert probe_classes(get_probe("sentiment"), [Row("a", 1), Row("b", 0)]) == [0, 1]


def test_single_token_fast_path_equals_the_multiple_choice_scorer(tiny_model, sst_rows):
    from pocketlm.eval.multiple_choice import continuation_logprobs, encode_pair
    from pocketlm.eval.zero_shot import single_token_logprobs

    model, tok = tiny_model
    rows = read_labelled(sst_rows, "sentence", "sentiment").rows[:12]
    words = PROBES["sentiment"].verbalizers[5]
    requests = [encode_pair(tok, "Review:" + r.text + "\nSentiment:", " " + w) for r in rows for w in words]
    fast = single_token_logprobs(model, requests, 5, batch_size=4)
    assert fast == pytest.approx(continuation_logprobs(model, requests, batch_size=4), abs=1e-4)
    multi = [encode_pair(tok, "Q:", " not at all"), encode_pair(tok, "Q:", " yes")]
    assert single_token_logprobs(model, multi, 2) is None  # a multi-token word: the general path


def test_zero_shot_is_a_forgetting_probe_with_baseline(tmp_path, sst_rows, tiny_model):
    model, tok = tiny_model
    base = save_model(model, tok, tmp_path / "base")
    torch.manual_seed(5)
    other = save_model(GPT(get_config("gpt2-tiny")), tok, tmp_path / "other")
    out = tmp_path / "f.json"
    main(["eval", str(other), "--baseline", str(base), "--zero-shot", "sentiment", str(sst_rows), "--json", str(out)])
    report = json.loads(out.read_text())
    before = evaluate_zero_shot(model, tok, read_labelled(sst_rows, "sentence", "sentiment").rows,
                                get_probe("sentiment"))
    assert report["forgetting"]["accuracy"]["before"] == pytest.approx(before["accuracy"])
    assert report["forgetting"]["accuracy"]["after"] == pytest.approx(report["accuracy"])
