"""The training loop: loss falls, exact resume, atomic checkpoints, early stopping, schedules, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pocketlm.cli import main
from pocketlm.errors import UserError
from pocketlm.io import folders, load_model
from pocketlm.model import GPT
from pocketlm.recipe import TrainConfig, load_recipe
from pocketlm.rundir import RunDir
from pocketlm.train import Trainer, build_model, lr_at, train

SMALL = dict(model="gpt2-tiny", batch_tokens=256, micro_batch=4, context=32, eval_every=4, eval_batches=2,
             log_every=1, warmup_steps=2, lr=3e-3, device="cpu", precision="fp32")


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**SMALL, **kw})


def _losses(run: Path, key: str = "train_loss") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _train(cfg: TrainConfig) -> dict:
    model, tokenizer = build_model(cfg.model, cfg.data, cfg.seed)
    return train(model, tokenizer, cfg)


def test_training_lowers_validation_loss_and_writes_a_run(tiny_data, tmp_path):
    summary = _train(_cfg(tiny_data, tmp_path / "run", max_steps=12))
    val = _losses(tmp_path / "run", "val_loss")
    assert [s for s, _ in val] == [4, 8, 12]
    assert val[-1][1] < val[0][1] - 0.5
    assert [s for s, _ in _losses(tmp_path / "run")] == list(range(1, 13))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "tokens", "train_loss", "lr", "tokens_per_s", "memory_bytes", "context"} <= set(row)
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 256
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "summary.json").exists()
    model, _ = load_model(tmp_path / "run")  # the best checkpoint is a loadable model folder
    assert model.config.name == "gpt2-tiny"


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_step_for_step(tiny_data, tmp_path, monkeypatch):
    kw = dict(max_steps=10, dropout=0.1, save_every=2, eval_every=5)
    _train(_cfg(tiny_data, tmp_path / "full", **kw))

    original_save = Trainer.save

    def save_then_die(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        if self.state["step"] == 6:
            raise _Interrupt  # the process dies right after the step-6 checkpoint
    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(_Interrupt):
        _train(_cfg(tiny_data, tmp_path / "cut", **kw))
    monkeypatch.setattr(Trainer, "save", original_save)
    with pytest.raises(UserError, match="--resume"):
        _train(_cfg(tiny_data, tmp_path / "cut", **kw))
    _train(_cfg(tiny_data, tmp_path / "cut", resume=True, **kw))

    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    assert _losses(tmp_path / "cut", "val_loss") == _losses(tmp_path / "full", "val_loss")


def test_crash_during_checkpoint_save_keeps_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    from pocketlm import train as train_module

    calls = {"n": 0}
    real_write = folders.write_model_files

    def write_then_crash(model, tokenizer, directory, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half a file, then die
            (directory / "model.safetensors").write_bytes(b"partial")
            raise _Interrupt
        real_write(model, tokenizer, directory, metadata)
    monkeypatch.setattr(train_module.folders, "write_model_files", write_then_crash)
    with pytest.raises(_Interrupt):
        _train(_cfg(tiny_data, tmp_path / "run", max_steps=8, save_every=4, eval_every=4))
    latest = RunDir(tmp_path / "run").checkpoint("latest")
    assert latest is not None and latest.name == "step-0000004"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best", "latest", "step-0000004"]
    model, _ = load_model(tmp_path / "run")
    assert torch.isfinite(model.lm_head.weight).all()


def test_early_stopping_stops_after_patience(tiny_data, tmp_path):
    # A learning rate this large makes validation loss rise: training must stop after 1 bad evaluation.
    summary = _train(_cfg(tiny_data, tmp_path / "run", max_steps=40, lr=5.0, warmup_steps=0, eval_every=2,
                          patience=1, grad_clip=0.0))
    assert summary["stopped_early"] and summary["steps"] < 40
    assert RunDir(tmp_path / "run").checkpoint("best") is not None


def test_context_schedule_changes_sequence_length(tiny_data, tmp_path):
    _train(_cfg(tiny_data, tmp_path / "run", max_steps=4, context=None, context_schedule=[[0, 16], [2, 32]],
                eval_every=100))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["context"] for r in rows] == [16, 16, 32, 32]


def test_learning_rate_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, data="x")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))
    assert not math.isnan(lr_at(500, cfg))


def test_recipes_load_and_flags_override():
    cfg = load_recipe("shakespeare-scratch", {"max_steps": 7})
    assert cfg.max_steps == 7 and cfg.model == "gpt2-mini"
    with pytest.raises(UserError, match="unknown keys"):
        bad = Path(__file__).parent / "_bad_recipe.yaml"
        bad.write_text("max_stepz: 3\n")
        try:
            load_recipe(str(bad), {})
        finally:
            bad.unlink()


@pytest.mark.parametrize("args, message", [
    (["--data", "{missing}"], "not a prepared data set"),
    (["--batch-tokens", "100"], "not divisible"),
    (["--lr", "-1"], "lr must be positive"),
    (["--config", "no-such-recipe"], "no recipe"),
    (["--model", "gpt9"], "unknown model"),
])
def test_pretrain_user_errors_exit_2(tiny_data, tmp_path, capsys, args, message):
    base = ["pretrain", "--model", "gpt2-tiny", "--data", str(tiny_data), "--out", str(tmp_path / "r"),
            "--max-steps", "1", "--context", "32", "--micro-batch", "4", "--batch-tokens", "128",
            "--device", "cpu"]
    args = [a.replace("{missing}", str(tmp_path / "missing")) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(base + args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_data_from_another_tokenizer_is_refused(tiny_data, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from pocketlm.tokenizer import Tokenizer

    model, _ = build_model("gpt2-tiny", str(tiny_data), 0)
    other = Tokenizer(HFTokenizer(models.BPE(vocab={"a": 0, "<eos>": 1}, merges=[])), "other", "<eos>")
    with pytest.raises(UserError, match="different tokenizer"):
        train(model, other, _cfg(tiny_data, tmp_path / "run", max_steps=1))


def test_activation_checkpointing_gives_the_same_loss_and_gradients_for_less_saved_memory():
    """Recomputing each block in backward (dropout included: its RNG state is replayed) changes no number."""
    torch.manual_seed(0)
    model = GPT.from_name("gpt2-tiny", dropout=0.1).train()
    ids = torch.randint(0, 50257, (2, 33))

    def run(checkpointing: bool):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        loss.backward()
        activations = sum(t.numel() for t in saved if t.dim() == 3)  # (batch, time, width) tensors
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, activations

    loss, grads, saved = run(False)
    ac_loss, ac_grads, ac_saved = run(True)
    assert torch.equal(loss, ac_loss)
    for name in grads:
        torch.testing.assert_close(ac_grads[name], grads[name], rtol=0, atol=0, msg=name)
    assert ac_saved < saved / 2


def test_activation_checkpointing_flag_and_recipe_key_reach_the_config():
    import argparse

    from pocketlm.recipe import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert config_from_args(parser.parse_args([])).activation_checkpointing is False
    assert config_from_args(parser.parse_args(["--activation-checkpointing"])).activation_checkpointing is True


@pytest.mark.slow  # inductor compiles C++ on the CPU: about a minute on 2 cores
def test_compiled_training_follows_eager_training(tiny_data, tmp_path):
    eager = _losses_of(_cfg(tiny_data, tmp_path / "eager", max_steps=3, eval_every=100))
    compiled = _losses_of(_cfg(tiny_data, tmp_path / "compiled", max_steps=3, eval_every=100, compile=True))
    assert [s for s, _ in compiled] == [1, 2, 3]
    assert [loss for _, loss in compiled] == pytest.approx([loss for _, loss in eager], rel=1e-3)


def _losses_of(cfg: TrainConfig) -> list[tuple[int, float]]:
    _train(cfg)
    return _losses(Path(cfg.out))


def test_recomputing_some_blocks_changes_no_number_and_saves_in_proportion():
    """activation_checkpointing = k recomputes the first k blocks: same loss and gradients, and the saved
    activations fall with k."""
    torch.manual_seed(0)
    model = GPT.from_name("gpt2-tiny").train()
    ids = torch.randint(0, 50257, (2, 33))
    n = len(model.transformer.h)

    def run(setting):
        model.activation_checkpointing = setting
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, \
            sum(t.numel() for t in saved if t.dim() == 3)

    results = [run(setting) for setting in (False, 1, n - 1, True)]
    for loss, grads, _ in results[1:]:
        assert torch.equal(loss, results[0][0])
        for name in grads:
            torch.testing.assert_close(grads[name], results[0][1][name], rtol=0, atol=0, msg=name)
    saved = [r[2] for r in results]
    assert saved[0] > saved[1] > saved[2] > saved[3]


@pytest.mark.parametrize("text, value", [("2GB", 2 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("800mb", 800 * 10**6),
                                         ("123", 123), ("64 MiB", 64 * 2**20), ("3g", 3 * 10**9)])
def test_memory_sizes_parse(text, value):
    from pocketlm.recompute import parse_size

    assert parse_size(text) == value


def test_a_memory_budget_picks_the_least_recomputation_that_fits():
    from pocketlm.recompute import parse_size, plan_recompute

    with pytest.raises(UserError, match="is not a size"):
        parse_size("lots")
    torch.manual_seed(0)
    model = GPT.from_name("gpt2-tiny")
    plan = dict(micro_batch=4, context=64, device=torch.device("cpu"), precision="fp32", before_training=10**9)
    _, estimate = plan_recompute(model, budget=10**15, **plan)
    assert estimate["recompute"] == 0 and estimate["block_bytes"] > estimate["block_input_bytes"] > 0
    n, block, kept = estimate["blocks"], estimate["block_bytes"], estimate["block_input_bytes"]
    full = estimate["estimated_peak"]
    chosen = [plan_recompute(model, budget=full - int((k - 0.5) * (block - kept)), **plan)[0] for k in range(1, n + 1)]
    assert chosen == list(range(1, n + 1))  # each block less of budget recomputes one more block
    with pytest.raises(UserError, match="even with every block recomputed: raise it, or lower --micro-batch"):
        plan_recompute(model, budget=full - int((n + 0.5) * (block - kept)), **plan)


def test_max_memory_reaches_the_trainer_and_is_said(tiny_data, tmp_path, capsys):
    _train(_cfg(tiny_data, tmp_path / "run", max_steps=2, max_memory="1000GB"))
    assert "--max-memory 1000GB: recomputing 0 of 4 blocks in backward (estimated peak " in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--model", "gpt2-tiny", "--data", str(tiny_data), "--out", str(tmp_path / "small"),
              "--max-steps", "1", "--device", "cpu", "--max-memory", "1MB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "even with every block recomputed" in err[-1]
    assert not (tmp_path / "small" / "checkpoints").exists()
