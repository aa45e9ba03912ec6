"""Classification: reading labelled files (the CS224N ones as they are), the head on the last real token
under any padding, metrics, batches with exact positions, and checkpoints that transformers and PEFT load
with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pocketlm import lora
from pocketlm.classify.data import class_labels, encode_rows, label_ids, read_labelled, split_rows
from pocketlm.classify.io import ClassifierInfo, ClassifierSaver, load_classifier, save_classifier
from pocketlm.classify.metrics import classification_metrics
from pocketlm.classify.model import attach_head, classifier_logits, hidden_states, pack_left, pad_batch
from pocketlm.classify.train import ClassificationBatches, ClassificationObjective
from pocketlm.errors import UserError
from pocketlm.io import peft, save_model
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY_KW = {"gpt2": {}, "llama": dict(n_kv_head=2, intermediate_size=48, bias=False, tie_embeddings=False)}


def tiny(family: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(name=f"tiny-{family}", family=family, n_layer=2, n_head=4, n_embd=32, block_size=64,
                      **FAMILY_KW[family])
    return GPT(cfg).eval()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- data -------------------------------------------------------------------------------------------
def test_cs224n_files_read_as_they_are(shared_data):
    sst = read_labelled(shared_data / "sst" / "ids-sst-dev.csv", "sentence", "sentiment")
    assert len(sst.rows) == 1101 and sst.skipped_total == 0
    assert class_labels(sst.rows) == [0, 1, 2, 3, 4]
    assert sst.label_counts() == {0: 139, 1: 289, 2: 229, 3: 279, 4: 165}  # SOURCE.md
    quora = read_labelled(shared_data / "quora" / "quora-dev.csv", "sentence1", "is_duplicate", "sentence2")
    assert len(quora.rows) == 20212 and quora.skipped_total == 2  # the two malformed rows, counted
    assert class_labels(quora.rows) == [0, 1]  # "0.0" / "1.0"
    assert quora.label_counts() == {0: 12627, 1: 7585}


def test_seeded_split_is_reproducible_and_disjoint(shared_data):
    rows = read_labelled(shared_data / "quora" / "quora-dev.csv", "sentence1", "is_duplicate", "sentence2").rows
    a = split_rows(rows, 1337, 0.1, 0.1)
    b = split_rows(rows, 1337, 0.1, 0.1)
    c = split_rows(rows, 7, 0.1, 0.1)
    assert [[r.line for r in part] for part in a] == [[r.line for r in part] for part in b]
    assert [r.line for r in a[1]] != [r.line for r in c[1]]
    lines = [set(r.line for r in part) for part in a]
    assert sum(map(len, lines)) == len(rows) and not (lines[0] & lines[1]) and not (lines[1] & lines[2])
    assert (len(a[1]), len(a[2])) == (2021, 2021)


def test_malformed_rows_are_counted_not_fatal(tmp_path):
    path = write(tmp_path / "d.tsv", "id\ttext\tlabel\n1\tgood film\tpos\n2\tbad film\n3\t\tneg\n"
                                     "4\tawful\tneg\textra\n5\tfine\tpos\n6\tmeh\t\n")
    data = read_labelled(path, "text", "label")
    assert [r.text for r in data.rows] == ["good film", "fine"]
    assert data.skipped == {"wrong number of fields": 2, "empty or missing text": 1, "missing label": 1}
    rows = read_labelled(write(tmp_path / "d.jsonl", '{"t": "a", "y": "x"}\nnot json\n{"t": "b", "y": "z"}\n'),
                         "t", "y")
    assert len(rows.rows) == 2 and rows.skipped == {"malformed": 1}


@pytest.mark.parametrize("content, message", [
    ("text,label\n", "no data rows"),
    ("", "is empty"),
    ("text,sentiment\na,1\nb,0\n", "no column 'label' for --label-column"),
    ("text,label\na,1\nb,1\n", "single class"),
    ("text,label\na,0.5\nb,1\n", "is not an integer"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, content, message):
    path = write(tmp_path / "bad.csv", content)
    with pytest.raises(UserError, match=message) as info:
        class_labels(read_labelled(path, "text", "label").rows, str(path))
    assert "\n" not in str(info.value)


def test_jsonl_labels_must_be_integers_or_strings(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": [1]}\n{"text": "b", "label": 0}\n')
    with pytest.raises(UserError, match="neither an integer nor a string"):
        read_labelled(path, "text", "label")
    ok = read_labelled(write(tmp_path / "ok.jsonl", '{"text": "a", "label": "neg"}\n{"text": "b", "label": "pos"}\n'),
                       "text", "label")
    assert class_labels(ok.rows) == ["neg", "pos"]
    with pytest.raises(UserError, match="not trained on"):
        label_ids(ok.rows, ["neg", "neutral"])


def test_encoding_pairs_with_separator_and_truncation_counts():
    tok = load_tokenizer("gpt2")
    rows = [type("R", (), {"text": "one two three four five six", "text_pair": "seven eight"})()]
    enc = encode_rows(tok, rows, max_length=64)
    a, b = tok.encode(rows[0].text), tok.encode(rows[0].text_pair)
    assert enc.ids[0] == a + [tok.eos_id] + b and enc.truncated == 0
    enc = encode_rows(tok, rows, max_length=6)  # budget 5: the short pair (2) stays whole
    assert enc.ids[0] == a[:3] + [tok.eos_id] + b and enc.truncated == 1
    single = [type("R", (), {"text": "one two three four five six", "text_pair": None})()]
    enc = encode_rows(tok, single, max_length=4)
    assert enc.ids[0] == a[:4] and enc.truncated == 1


# -- the head ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_states_equal_the_models_own_forward(family):
    model = tiny(family)
    captured = {}
    model.transformer.ln_f.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(idx)
        ours = hidden_states(model, idx)
    assert torch.equal(ours, captured["x"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_last_real_token_under_left_right_padding_and_pad_equal_to_eot(family):
    model = tiny(family)
    attach_head(model, 3, seed=0)
    eot = 50256
    rows = [[5, 6, 7, 8, 9, 10], [11, eot, 12], [13, 14, eot]]  # eot inside and at the end of real text
    with torch.no_grad():
        alone = torch.cat([classifier_logits(model, torch.tensor([r])) for r in rows])
        for side in ("right", "left"):
            ids, mask = pad_batch(rows, eot, side=side)
            assert torch.allclose(classifier_logits(model, ids, mask), alone, atol=1e-5), side
    ids, mask = pad_batch(rows, eot, side="left")
    packed, lengths = pack_left(ids, mask)
    assert lengths.tolist() == [6, 3, 3] and packed[1, :3].tolist() == rows[1]


def test_objective_trains_only_the_head_for_method_head():
    from pocketlm.classify.model import set_trainable

    model = tiny("gpt2")
    attach_head(model, 2, seed=0)
    set_trainable(model, "head")
    ids, mask = pad_batch([[1, 2, 3], [4, 5]], 0)
    loss = ClassificationObjective().loss(model.train(), {"input_ids": ids, "attention_mask": mask,
                                                     "labels": torch.tensor([0, 1])})
    loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads == ["score.weight"]


def test_batches_are_a_pure_function_of_position_and_group_lengths():
    ids = [[1] * (i % 17 + 1) for i in range(100)]
    labels = [i % 3 for i in range(100)]
    a = ClassificationBatches(ids, labels, seed=3, pad_id=0, group=20)
    b = ClassificationBatches(ids, labels, seed=3, pad_id=0, group=20)
    b.get(250, 8)  # another epoch first: no hidden state may leak into the next call
    for pos in (0, 96, 137):
        x, y = a.get(pos, 8), b.get(pos, 8)
        assert all(torch.equal(x[k], y[k]) for k in x)
    epoch0 = [r for p in range(0, 100, 10) for r in a.rows(p, 10)]
    assert sorted(epoch0) == list(range(100))  # every row once per epoch
    assert a.rows(0, 20) == sorted(a.rows(0, 20), key=lambda i: -len(ids[i]))  # sorted inside a group
    assert a.rows(100, 100) != a.rows(0, 100)  # a new order each epoch


def test_metrics_match_hand_computed_values():
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 0], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    # a: P 1/3 R 1/2 F1 0.4; b: P 2/3 R 1 F1 0.8; c: never predicted, F1 0
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.4)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(0.4)


# -- checkpoints and interop ------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 50256, 16, 17]]


def _hf_logits(model, rows, pad_id):
    ids, mask = pad_batch(rows, pad_id, side="right")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _ours(model, rows, pad_id):
    ids, mask = pad_batch(rows, pad_id, side="left")
    with torch.no_grad():
        return classifier_logits(model, ids, mask)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_classifier_loads_in_transformers_with_the_same_logits(family, tmp_path):
    model = tiny(family)
    attach_head(model, 3, seed=1)
    tok = load_tokenizer("gpt2")
    info = ClassifierInfo(labels=["neg", "neu", "pos"], text_column="sentence", pad_id=0)
    save_classifier(model, tok, tmp_path / "clf", info)
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    assert type(hf_model).__name__ == ("GPT2" if family == "gpt2" else "Llama") + "ForSequenceClassification"
    assert hf_model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    theirs = _hf_logits(hf_model, ROWS, pad_id=0)
    assert (theirs - _ours(model, ROWS, pad_id=0)).abs().max() < 1e-4
    loaded, _, loaded_info = load_classifier(tmp_path / "clf")
    assert loaded_info.labels == ["neg", "neu", "pos"] and loaded_info.text_column == "sentence"
    assert (_ours(loaded, ROWS, pad_id=0) - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_classifier_is_a_peft_adapter_with_the_head_in_modules_to_save(family, tmp_path):
    from peft import PeftModel

    tok = load_tokenizer("gpt2")
    base_dir = save_model(tiny(family), tok, tmp_path / "base")
    model = tiny(family)
    attach_head(model, 2, seed=2)
    lora.prepare_model(model, "lora", 4, 8.0, 0.0, "attn", base=str(base_dir))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    info = ClassifierInfo(labels=[0, 1], method="lora", pad_id=0)
    step = tmp_path / "step"
    step.mkdir()
    ClassifierSaver(peft.LoraSaver(base_dir), info).save(model, tok, step)
    cfg = json.loads((step / "adapter" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"] and cfg["task_type"] == "SEQ_CLS"

    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2,
                                                                              pad_token_id=0)
    peft_model = PeftModel.from_pretrained(hf_base, step / "adapter").eval()
    theirs = _hf_logits(peft_model, ROWS, pad_id=0)
    assert (theirs - _ours(model, ROWS, pad_id=0)).abs().max() < 1e-4
    loaded, _, loaded_info = load_classifier(step)
    assert loaded_info.method == "lora"
    assert (_ours(loaded, ROWS, pad_id=0) - theirs).abs().max() < 1e-4
    with pytest.raises(UserError, match="classifier adapter"):  # a plain LM cannot take the head
        peft.load_adapter(tiny(family), step / "adapter")


def test_transformers_classifier_loads_in_pocketlm(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   num_labels=4, pad_token_id=0)
    hf_model = transformers.LlamaForSequenceClassification(cfg).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    model, _, info = load_classifier(tmp_path / "hf")
    assert info.labels == ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]
    assert (_ours(model, ROWS, 0) - _hf_logits(hf_model, ROWS, 0)).abs().max() < 1e-4
    assert isinstance(model.score, nn.Linear)


def test_cli_eval_classify_reports_accuracy_macro_f1_and_predictions(tmp_path, shared_data, capsys):
    from pocketlm.cli import main

    model = tiny("gpt2")
    attach_head(model, 5, seed=0)
    save_classifier(model, load_tokenizer("gpt2"), tmp_path / "clf",
                    ClassifierInfo(labels=[0, 1, 2, 3, 4], text_column="sentence", label_column="sentiment",
                                   max_length=16, pad_id=50256))
    out = tmp_path / "r.json"
    main(["eval", str(tmp_path / "clf"), "--classify", str(shared_data / "sst" / "ids-sst-dev.csv"),
          "--limit", "30", "--json", str(out)])
    report = json.loads(out.read_text())
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["macro_f1"] <= 1 and report["examples"] == 30
    matrix = report["confusion_matrix"]
    assert len(matrix) == 5 and sum(map(sum, matrix)) == 30
    assert report["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(5)) / 30)
    assert report["truncated_rows"] > 0  # max_length 16: SST sentences are longer, cut and counted
    preds = [json.loads(x) for x in Path(report["predictions_file"]).read_text().splitlines()]
    assert len(preds) == 30 and sum(p["correct"] for p in preds) == round(report["accuracy"] * 30)
    with pytest.raises(SystemExit) as info:
        main(["eval", str(tmp_path / "clf"), "--classify", str(shared_data / "quora" / "quora-dev.csv")])
    assert info.value.code == 2
    assert "no column 'sentence'" in capsys.readouterr().err.strip().splitlines()[-1]


def test_peft_made_classifier_adapter_loads_in_pocketlm(tmp_path):
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer("gpt2")
    base_dir = save_model(tiny("llama"), tok, tmp_path / "base")
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3,
                                                                             pad_token_id=0)
    peft_model = get_peft_model(hf_model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights="gaussian"))
    peft_model.save_pretrained(tmp_path / "adapter")  # modules_to_save: ["classifier", "score"]
    model, _, info = load_classifier(tmp_path / "adapter")
    assert info.num_labels == 3
    assert (_ours(model, ROWS, 0) - _hf_logits(peft_model.eval(), ROWS, 0)).abs().max() < 1e-4


def test_length_groups_are_exact_and_change_no_logits():
    from pocketlm.classify.model import length_groups

    lengths = [3, 40, 4, 38, 5, 41]
    groups = length_groups(lengths, overhead=8)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert sorted(map(sorted, groups)) == [[0, 2, 4], [1, 3, 5]]  # short rows apart from long ones
    assert length_groups(lengths, overhead=10_000) == [[0, 2, 4, 3, 1, 5]]  # one group when passes are dear
    model = tiny("llama")
    attach_head(model, 3, seed=0)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in lengths]
    ids, mask = pad_batch(rows, 0)
    with torch.no_grad():
        whole = classifier_logits(model, ids, mask)
        grouped = classifier_logits(model, ids, mask, group_overhead=8)
    assert torch.allclose(whole, grouped, atol=1e-5)


def test_merge_folds_a_lora_classifier_into_a_transformers_classifier(tmp_path):
    from pocketlm.cli import main

    tok = load_tokenizer("gpt2")
    base_dir = save_model(tiny("llama"), tok, tmp_path / "base")
    model = tiny("llama")
    attach_head(model, 2, seed=2)
    lora.prepare_model(model, "lora", 4, 8.0, 0.0, "attn+mlp", base=str(base_dir))
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0, 0.2)
    step = tmp_path / "step"
    step.mkdir()
    ClassifierSaver(peft.LoraSaver(base_dir), ClassifierInfo(labels=["no", "yes"], method="lora")).save(model, tok, step)
    main(["merge", str(step), "--out", str(tmp_path / "merged")])
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert (_hf_logits(hf_model, ROWS, 0) - _ours(model, ROWS, 0)).abs().max() < 1e-4
    assert load_classifier(tmp_path / "merged")[2].method == "lora-merged"


def test_a_classifier_given_to_generate_says_what_it_is(tmp_path, capsys):
    from pocketlm.cli import main

    model = tiny("gpt2")
    attach_head(model, 2, seed=0)
    save_classifier(model, load_tokenizer("gpt2"), tmp_path / "clf", ClassifierInfo(labels=[0, 1]))
    with pytest.raises(SystemExit) as info:
        main(["generate", str(tmp_path / "clf"), "--prompt", "hi", "--max-new-tokens", "2"])
    assert info.value.code == 2
    assert "is a classifier" in capsys.readouterr().err.strip().splitlines()[-1]
