"""`pocketlm eval`: the interface outside tools rely on, and bad input exiting with code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import sacrebleu
import torch

from pocketlm.cli import main
from pocketlm.io import save_model
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import load_tokenizer

TEXT = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(7)
    cfg = ModelConfig(name="t", family="gpt2", vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=32)
    return save_model(GPT(cfg), load_tokenizer("gpt2"), tmp_path_factory.mktemp("m") / "model")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "general.txt"
    path.write_text(TEXT)
    return path


def run_eval(*args: str) -> None:
    main(["eval", *map(str, args)])


def test_text_reports_loss_perplexity_bits_per_byte(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    run_eval(model_dir, "--text", text_file, "--context", 32, "--stride", 16, "--json", out)
    report = json.loads(out.read_text())
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-6)
    n_tokens = len(load_tokenizer("gpt2").encode(TEXT))
    assert report["tokens"] == n_tokens
    assert report["bits_per_byte"] == pytest.approx(report["loss"] * n_tokens / math.log(2) / len(TEXT.encode()))
    assert report["model"] == str(model_dir) and report["metrics"]["loss"] == report["loss"]
    assert report["data"] == {str(text_file): "sha256:" + __import__("hashlib").sha256(TEXT.encode()).hexdigest()}
    assert report["settings"]["context"] == 32
    table = capsys.readouterr().out
    assert "perplexity" in table and "bits_per_byte" in table


def test_data_split(model_dir, tiny_data, tmp_path):
    out = tmp_path / "d.json"
    run_eval(model_dir, "--data", tiny_data, "--split", "val", "--max-tokens", 100, "--context", 32, "--json", out)
    report = json.loads(out.read_text())
    assert report["tokens"] == 100 and report["loss"] > 0
    assert any(k.endswith("manifest.json") for k in report["data"])


def test_multiple_choice_with_limit(model_dir, shared_data, tmp_path):
    out = tmp_path / "mc.json"
    run_eval(model_dir, "--multiple-choice", shared_data / "hellaswag" / "hellaswag_val.jsonl", "--limit", 4,
             "--json", out)
    report = json.loads(out.read_text())
    assert report["mc_items"] == 4 and len(report["details"]) == 4
    assert report["acc"] == sum(d["pred"] == d["label"] for d in report["details"]) / 4
    assert report["acc_norm"] == sum(d["pred_norm"] == d["label"] for d in report["details"]) / 4


def test_prompts_save_generations_beside_the_json(model_dir, shared_data, tmp_path):
    d = shared_data / "sonnets"
    prompts = tmp_path / "dev.jsonl"
    run_eval("none", "--sonnet-prompts", d / "sonnets_held_out_dev.txt", d / "TRUE_sonnets_held_out_dev.txt",
             "--write-prompts", prompts)
    assert len(prompts.read_text().splitlines()) == 12
    out = tmp_path / "gen.json"
    sampling = ["--max-new-tokens", 6, "--temperature", 0.8, "--top-k", 50, "--top-p", 0.9,
                "--repetition-penalty", 1.1, "--seed", 3]
    run_eval(model_dir, "--prompts", prompts, "--limit", 2, *sampling, "--form", "sonnet", "--json", out)
    report = json.loads(out.read_text())
    gens = [json.loads(x) for x in (tmp_path / "gen.generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 and report["generations_file"] == str(tmp_path / "gen.generations.jsonl")
    hyps, refs = [g["hypothesis"] for g in gens], [g["reference"] for g in gens]
    assert report["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert report["form_pass_rate"] == 0.0 and "distinct_2" in report
    assert report["settings"]["sampling"]["top_k"] == 50 and report["settings"]["sampling"]["seed"] == 3
    run_eval(model_dir, "--prompts", prompts, "--limit", 2, *sampling, "--json", tmp_path / "again.json")
    again = [json.loads(x) for x in (tmp_path / "again.generations.jsonl").read_text().splitlines()]
    assert [g["completion"] for g in again] == [g["completion"] for g in gens]  # seeded: reproducible


def test_form_without_a_model(shared_data, tmp_path):
    out = tmp_path / "f.json"
    run_eval("none", "--form", "sonnet", "--texts", shared_data / "sonnets" / "TRUE_sonnets_held_out_dev.txt",
             "--json", out)
    report = json.loads(out.read_text())
    assert report["pass_rate"] == 1.0 and report["total"] == 12 and report["model"] is None
    assert len(report["samples"]) == 12 and "rhyme_pairs" in report["samples"][0]["diagnostics"]
    texts = tmp_path / "g.jsonl"
    texts.write_text(json.dumps({"text": ">be me\n>pass"}) + "\n" + json.dumps({"text": "no arrows"}) + "\n")
    run_eval("none", "--form", "greentext", "--texts", texts, "--json", out)
    report = json.loads(out.read_text())
    assert report["pass_rate"] == 0.5 and report["samples"][1]["problems"]


def test_forgetting_with_an_adapter(model_dir, text_file, tmp_path):
    from pocketlm.io import load_model
    from pocketlm.io.peft import save_adapter
    from pocketlm.lora import prepare_model

    model, _ = load_model(model_dir)
    prepare_model(model, "lora", rank=2, alpha=4, dropout=0.0, targets="attn", base=str(model_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero adapter, so the model changes
    adapter = save_adapter(model, tmp_path / "adapter", base=str(model_dir))
    out = tmp_path / "fg.json"
    run_eval(model_dir, "--adapter", adapter, "--forgetting", "--text", text_file, "--context", 32, "--json", out)
    report = json.loads(out.read_text())
    loss = report["forgetting"]["loss"]
    assert loss["after"] == pytest.approx(report["loss"]) and loss["before"] != pytest.approx(loss["after"])
    assert loss["delta"] == pytest.approx(loss["after"] - loss["before"])
    base = tmp_path / "base.json"
    run_eval(model_dir, "--text", text_file, "--context", 32, "--json", base)
    assert json.loads(base.read_text())["loss"] == pytest.approx(loss["before"])


@pytest.mark.parametrize("args,message", [
    (["none", "--form", "sonnet"], "--form needs --texts"),
    (["none", "--form", "haiku", "--texts", "{text}"], "unknown form"),
    (["none", "--text", "{text}"], "needs a model"),
    (["none", "--multiple-choice", "{text}"], "needs a model"),
    (["none", "--form", "sonnet", "--texts", "{missing}"], "does not exist"),
    (["{model}", "--text", "{missing}"], "does not exist"),
    (["{model}", "--multiple-choice", "{missing}"], "does not exist"),
    (["none", "--texts", "{text}"], "--texts needs --form"),
    (["none"], "nothing to evaluate"),
    (["{model}", "--text", "{text}", "--forgetting"], "give --adapter"),
    (["{model}", "--text", "{text}", "--context", "4096"], "longer than the model's context"),
    (["{model}", "--prompts", "{text}"], "not valid JSON"),
])
def test_bad_input_exits_2(args, message, model_dir, text_file, tmp_path, capsys):
    fill = {"{text}": str(text_file), "{missing}": str(tmp_path / "missing.txt"), "{model}": str(model_dir)}
    with pytest.raises(SystemExit) as exc:
        run_eval(*[fill.get(a, a) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_subprocess_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pocketlm", "eval", "none", "--form", "sonnet"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--form needs --texts" in proc.stderr
