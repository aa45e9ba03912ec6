"""`pocketlm finetune --task classify`: head, full and LoRA classifiers through the one Trainer (it learns,
accuracy picks the best checkpoint, exact resume, a seeded split when there is no validation file), the
saved run loads in transformers, and bad input is a one-line error."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from pocketlm.cli import main
from pocketlm.io import save_model
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the a film movie plot actors story scenes music was is very quite rather and".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", family="gpt2", n_layer=2, n_head=2, n_embd=32, block_size=64)
    return save_model(GPT(cfg), load_tokenizer("gpt2"), tmp_path_factory.mktemp("base") / "tiny")


def _sentiment_file(path: Path, n: int, seed: int) -> Path:
    """Rows whose label is said by their last word, after filler words (TSV, CS224N layout): a random tiny
    base's last hidden state carries it, so even a head on a frozen base can learn it."""
    rng = random.Random(seed)
    lines = ["\tid\tsentence\tsentiment"]
    for i in range(n):
        label = rng.randrange(2)
        words = [rng.choice(WORDS) for _ in range(rng.randrange(3, 9))]
        words.append(["awful", "great"][label])
        lines.append(f"{i}\tid{i}\t {' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cls")
    return {"train": _sentiment_file(root / "train.csv", 160, 1), "dev": _sentiment_file(root / "dev.csv", 40, 2)}


def _flags(method: str, steps: int = 30, lr: str = "3e-3") -> list[str]:
    return ["--method", method, "--max-steps", str(steps), "--batch-size", "8", "--micro-batch", "4",
            "--eval-every", "10", "--log-every", "1", "--warmup-steps", "2", "--lr", lr, "--device", "cpu",
            "--precision", "fp32", "--seed", "0", "--max-length", "24", "--rank", "4", "--alpha", "8"]


def _finetune(base: Path, files, out: Path, method: str, *extra: str, val: bool = True) -> None:
    main(["finetune", "--task", "classify", "--base", str(base), "--data", str(files["train"]),
          *(["--val-data", str(files["dev"])] if val else []), "--text-column", "sentence",
          "--label-column", "sentiment", "--out", str(out), *_flags(method), *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["head", "full", "lora", "qlora"])
def test_each_method_learns_and_accuracy_picks_the_best_checkpoint(base, files, tmp_path, method):
    lr = {"head": "3e-2", "full": "3e-3", "lora": "1e-2", "qlora": "1e-2"}[method]
    main(["finetune", "--task", "classify", "--base", str(base), "--data", str(files["train"]),
          "--val-data", str(files["dev"]), "--text-column", "sentence", "--label-column", "sentiment",
          "--out", str(tmp_path / "run"), *_flags(method, steps=60, lr=lr)])
    rows = _metrics(tmp_path / "run")
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 50, 60]
    assert all(math.isfinite(r["val_loss"]) for r in evals)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = max(evals, key=lambda r: r["val_accuracy"])
    assert summary["best_val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "best").read_text().strip().endswith(f"{summary['best_step']:07d}")
    assert best["val_accuracy"] >= 0.8, evals  # one word decides the label: the loop must learn it
    assert (summary["trainable_params"] == 64) == (method == "head")  # head: 2 classes x 32 wide
    report = tmp_path / "eval.json"
    main(["eval", str(tmp_path / "run"), "--classify", str(files["dev"]), "--json", str(report)])
    assert json.loads(report.read_text())["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)


def test_resume_continues_step_for_step(base, files, tmp_path, monkeypatch):
    from pocketlm.train import Trainer

    _finetune(base, files, tmp_path / "whole", "lora")
    original = Trainer.save

    class Interrupt(Exception):
        pass

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state["step"] == 10:
            raise Interrupt

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Interrupt):
        _finetune(base, files, tmp_path / "cut", "lora")
    monkeypatch.setattr(Trainer, "save", original)
    _finetune(base, files, tmp_path / "cut", "lora", "--resume")
    whole = [(r["step"], r["train_loss"], r.get("val_accuracy")) for r in _metrics(tmp_path / "whole")]
    assert len(whole) == 30
    assert [(r["step"], r["train_loss"], r.get("val_accuracy")) for r in _metrics(tmp_path / "cut")] == whole


def test_a_file_without_validation_data_is_split_and_said_so(base, files, tmp_path, capsys):
    _finetune(base, files, tmp_path / "run", "head", val=False)
    err = capsys.readouterr().err
    assert "no --val-data: split" in err and "train 128 / val 16 / test 16" in err
    parts = {p: [json.loads(x) for x in (tmp_path / "run" / "splits" / f"{p}.jsonl").read_text().splitlines()]
             for p in ("train", "val", "test")}
    assert set(parts["val"][0]) == {"sentence", "sentiment", "line"}  # the file's own columns
    lines = [set(r["line"] for r in rows) for rows in parts.values()]
    assert sum(map(len, lines)) == 160 and not (lines[0] & lines[1]) and not (lines[0] & lines[2])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["split"]["seed"] == 0 and 0 <= summary["test_accuracy"] <= 1
    out = tmp_path / "t.json"  # --holdout selects the same rows from the original file
    main(["eval", str(tmp_path / "run"), "--classify", str(files["train"]), "--holdout", "test",
          "--holdout-seed", "0", "--json", str(out)])
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(summary["test_accuracy"])


def test_full_run_checkpoint_loads_in_transformers(base, files, tmp_path):
    transformers = pytest.importorskip("transformers")
    from pocketlm.classify.io import load_classifier
    from pocketlm.classify.model import classifier_logits, pad_batch

    _finetune(base, files, tmp_path / "run", "full")
    step = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "best").read_text().strip()
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(step).eval()
    model, tok, info = load_classifier(tmp_path / "run")
    rows = [tok.encode(" a great film ."), tok.encode(" the plot was awful and very")]
    ids, mask = pad_batch(rows, info.pad_id)
    with torch.no_grad():
        assert (hf_model(input_ids=ids, attention_mask=mask).logits - classifier_logits(model, ids, mask)).abs().max() < 1e-4


@pytest.mark.parametrize("content, flags, message", [
    ("\tid\tsentence\tsentiment\n0\ta\tgood\t1\n1\tb\tbad\t0\n", ["--label-column", "stars"], "no column 'stars'"),
    ("\tid\tsentence\tsentiment\n0\ta\tgood\t1\n1\tb\tbad\t1\n", [], "single class"),
    ("", [], "is empty"),
    ("\tid\tsentence\tsentiment\n0\ta\tgood\t0.5\n1\tb\tbad\t1\n", [], "is not an integer"),
    ("\tid\tsentence\tsentiment\n0\ta\tgood\t1\n1\tb\tbad\t0\n", ["--method", "head", "--task", "lm"],
     "--method head trains a classifier"),
    ("\tid\tsentence\tsentiment\n0\ta\tgood\t1\n1\tb\tbad\t0\n", ["--swap-pairs"], "--swap-pairs needs text pairs"),
])
def test_bad_input_is_one_line_and_exit_2(base, tmp_path, capsys, content, flags, message):
    data = tmp_path / "bad.csv"
    data.write_text(content)
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--task", "classify", "--base", str(base), "--data", str(data), "--text-column",
              "sentence", "--label-column", "sentiment", "--out", str(tmp_path / "run"), "--method", "full", *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("pocketlm finetune: error:")


def test_texts_longer_than_the_context_are_cut_and_counted(base, files, tmp_path, capsys):
    _finetune(base, files, tmp_path / "run", "head", "--max-length", "4096")
    err = capsys.readouterr().err
    assert "--max-length 4096 is longer than the model's context: using 64" in err
    short = tmp_path / "short"
    _finetune(base, files, short, "head", "--max-length", "3")
    assert "texts longer than 3 tokens were cut: train 160, val 40" in capsys.readouterr().err
    assert json.loads((short / "summary.json").read_text())["truncated_rows"] == {"train": 160, "val": 40}


def test_swap_pairs_trains_on_both_orders_of_the_training_pairs_only(base, tmp_path, capsys, monkeypatch):
    import pocketlm.classify.finetune as classify_finetune

    rng = random.Random(3)
    lines = ["id\tq1\tq2\tsame"]
    for i in range(60):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        lines.append(f"id{i}\tis it {a}\tis it {a if i % 2 else b}\t{int(i % 2 or a == b)}")
    data = tmp_path / "pairs.tsv"
    data.write_text("\n".join(lines) + "\n")
    encoded = {}
    real_encode = classify_finetune.encode_rows

    def spy(tokenizer, rows, max_length):
        encoded.setdefault("parts", []).append(list(rows))
        return real_encode(tokenizer, rows, max_length)

    monkeypatch.setattr(classify_finetune, "encode_rows", spy)
    main(["finetune", "--task", "classify", "--base", str(base), "--data", str(data), "--text-column", "q1",
          "--text-pair-column", "q2", "--label-column", "same", "--swap-pairs", "--out", str(tmp_path / "run"),
          *_flags("head", steps=4)])
    assert "--swap-pairs: training on 96 rows (every pair in both orders)" in capsys.readouterr().err
    train, val, test = encoded["parts"][:3]
    originals = train[:48]
    assert [(r.text_pair, r.text, r.label) for r in originals] == [(r.text, r.text_pair, r.label) for r in train[48:]]
    assert len(val) == len(test) == 6  # held-out parts are not mirrored
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["swap_pairs"] is True
    from pocketlm.classify.io import load_classifier
    from pocketlm.classify.predict import predict_logits, rows_logits

    model, tok, info = load_classifier(tmp_path / "run")
    assert info.symmetric_pairs is True  # predictions average both orders of a pair
    mixed, _ = rows_logits(model, tok, test, info)
    one = predict_logits(model, [tok.encode(r.text) + [info.separator_id] + tok.encode(r.text_pair) for r in test],
                         pad_id=info.pad_id)
    other = predict_logits(model, [tok.encode(r.text_pair) + [info.separator_id] + tok.encode(r.text) for r in test],
                           pad_id=info.pad_id)
    torch.testing.assert_close(mixed.exp(), (one.softmax(-1) + other.softmax(-1)) / 2)
    out = tmp_path / "eval.json"
    main(["eval", str(tmp_path / "run"), "--classify", str(data), "--json", str(out)])
    assert json.loads(out.read_text())["settings"]["both_pair_orders"] is True
