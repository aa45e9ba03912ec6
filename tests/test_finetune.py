"""`pocketlm finetune`: a pretrained base (HF folder, GGUF) through the one training loop, the tokenizer
check, the learning-rate search, LoRA dispatch, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketlm import finetune
from pocketlm.cli import main
from pocketlm.data.prepare import prepare
from pocketlm.io import gguf_write, load_model
from pocketlm.model import GPT, ModelConfig
from pocketlm.rundir import RunDir
from pocketlm.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

FLAGS = ["--device", "cpu", "--precision", "fp32", "--context", "32", "--micro-batch", "4", "--batch-tokens", "128",
         "--eval-batches", "2", "--warmup-steps", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    """A gpt2-tiny-sized GPT-2 saved by transformers, with GPT-2's tokenizer (built-in files)."""
    folder = tmp_path_factory.mktemp("base") / "gpt2-small-random"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    load_tokenizer("gpt2").save(folder)
    return folder


def _prepare(text: Path, out: Path, tokenizer: str) -> Path:
    prepare(text, out, tokenizer=tokenizer, val_fraction=0.1, min_val_tokens=65, progress=False,
            log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, tiny_text, gpt2_base) -> Path:
    return _prepare(tiny_text, tmp_path_factory.mktemp("data") / "gpt2", str(gpt2_base))  # the base's tokenizer


def _rows(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def test_full_finetune_of_a_hf_folder_runs_the_training_loop(tmp_path, gpt2_base, gpt2_data):
    run = tmp_path / "run"
    main(["finetune", "--base", str(gpt2_base), "--data", str(gpt2_data), "--method", "full", "--max-steps", "6",
          "--lr", "3e-3", "--eval-every", "3", "--out", str(run), *FLAGS])
    val = _rows(run, "val_loss")
    assert len(val) == 2 and val[1] < val[0]  # it learned from the data
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "full" and summary["base"] == str(gpt2_base) and summary["steps"] == 6
    assert summary["trainable_parameters"] == summary["parameters"]

    tuned, tok = load_model(run)  # the run's best checkpoint is a model folder ...
    base, _ = load_model(gpt2_base)
    assert tok.identity == load_tokenizer("gpt2").identity == load_tokenizer(str(run)).identity
    assert tuned.lm_head.weight is tuned.transformer.wte.weight
    assert not torch.equal(tuned.transformer.wte.weight, base.transformer.wte.weight)
    out = tmp_path / "exported"  # ... that exports to a folder transformers runs with the same logits
    main(["export", str(run), "--out", str(out)])
    ids = torch.tensor([tok.encode("To be, or not to be")])
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        assert (tuned(ids)[0] - theirs).abs().max() < 1e-4


def test_data_from_another_tokenizer_is_refused(tmp_path, tiny_text, gpt2_base):
    other = tmp_path / "tok"
    load_tokenizer("smollm2").save(other)
    data = _prepare(tiny_text, tmp_path / "smol-data", str(other))
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--base", str(gpt2_base), "--data", str(data), "--max-steps", "2",
              "--out", str(tmp_path / "run"), *FLAGS])
    assert exc.value.code == 2
    assert not (tmp_path / "run").exists()  # refused before loading weights or writing anything


def test_lr_search_picks_the_best_validation_loss_then_trains(tmp_path, gpt2_base, gpt2_data, monkeypatch, capsys):
    run = tmp_path / "run"
    args = ["finetune", "--base", str(gpt2_base), "--data", str(gpt2_data), "--max-steps", "4", "--eval-every", "4",
            "--lr-search", "1e-5,5e-3", "--lr-search-steps", "3", "--out", str(run), *FLAGS]
    main(args)
    record = json.loads((run / "lr_search.json").read_text())
    losses = {r["lr"]: r["val_loss"] for r in record["results"]}
    assert set(losses) == {1e-5, 5e-3} and record["steps"] == 3
    assert record["best_lr"] == min(losses, key=losses.get)
    assert record["best_lr"] == 5e-3  # 3 steps at 1e-5 barely move a random model
    assert record["at_edge"] == "largest"  # ... and the largest rate tried: the user hears of it
    assert "0.005 is the largest rate tried" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lr_search"]["best_lr"] == 5e-3 and summary["steps"] == 4
    assert max(_rows(run, "lr")) == pytest.approx(5e-3)  # the main run used the chosen rate
    assert not list((run / "lr_search").glob("*/checkpoints"))  # short runs keep numbers, not weights

    def no_search(*a, **k):
        raise AssertionError("a resumed run must reuse lr_search.json")

    monkeypatch.setattr(finetune, "search_lr", no_search)
    main([*args[:args.index("--max-steps") + 1], "6", *args[args.index("--max-steps") + 2:], "--resume"])
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def _small_tokenizer(text: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text], trainer)
    return Tokenizer(backend, "small", "<|endoftext|>")


def test_a_quantized_gguf_base_trains_with_full_and_lora(tmp_path, tiny_text):
    tok = _small_tokenizer(tiny_text.read_text())
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=64, intermediate_size=128, bias=False, tokenizer="small")
    base = gguf_write.write_gguf(GPT(cfg), tok, tmp_path / "base.gguf", dtype="q8_0")
    data = _prepare(tiny_text, tmp_path / "data", str(base))  # the GGUF's own tokenizer
    main(["finetune", "--base", str(base), "--data", str(data), "--method", "full", "--max-steps", "4",
          "--lr", "3e-3", "--eval-every", "2", "--out", str(tmp_path / "full"), *FLAGS])
    val = _rows(tmp_path / "full", "val_loss")
    assert val[-1] < val[0]
    tuned, _ = load_model(tmp_path / "full")
    assert all(p.dtype == torch.float32 for p in tuned.parameters())

    main(["finetune", "--base", str(base), "--data", str(data), "--method", "lora", "--rank", "4", "--targets",
          "attn", "--max-steps", "2", "--eval-every", "2", "--out", str(tmp_path / "lora"), *FLAGS])
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["adapter"]["rank"] == 4
    assert summary["trainable_parameters"] < summary["parameters"] / 10
    step = RunDir(tmp_path / "lora").checkpoint("latest")
    assert (step / "adapter" / "adapter_config.json").exists() and not (step / "model.safetensors").exists()
    assert load_tokenizer(str(tmp_path / "lora")).identity == tok.identity  # a run names its tokenizer

    main(["export", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")])  # the adapter folded in
    adapted, _ = load_model(tmp_path / "lora")
    merged, _ = load_model(tmp_path / "merged")
    ids = torch.tensor([tok.encode("To be, or not to be")])
    with torch.no_grad():
        assert (adapted(ids)[0] - merged(ids)[0]).abs().max() < 1e-4


@pytest.mark.parametrize("extra,message", [
    (["--lr-search", "fast,slow"], "comma-separated numbers"),
    (["--base", "no-such-model"], "unknown model 'no-such-model'"),
    (["--base", "gpt2-tiny"], "without pretrained weights"),
    ([], "no base model"),
])
def test_bad_finetune_arguments_exit_2(tmp_path, gpt2_base, gpt2_data, capsys, extra, message):
    base = [] if "--base" in extra or not extra else ["--base", str(gpt2_base)]
    with pytest.raises(SystemExit) as exc:
        main(["finetune", *base, *extra, "--data", str(gpt2_data), "--max-steps", "2",
              "--out", str(tmp_path / "run"), *FLAGS])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
