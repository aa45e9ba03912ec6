"""The Trainer's step-level API and extension points, the run directory module, recipes with adapters, and
the newcomer's rough edges (derived context and batch, help defaults, the lr-search edge warning)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pocketlm.cli import main
from pocketlm.errors import UserError
from pocketlm.model import GPT, ModelConfig
from pocketlm.objectives import LMObjective
from pocketlm.recipe import AdapterConfig, TrainConfig, load_recipe
from pocketlm.rundir import RunDir, is_run_dir, resolve_checkpoint, run_of_step
from pocketlm.tokenizer import load_tokenizer
from pocketlm.train import Trainer, build_model, derive_batch_shape, trainer_on_windows

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(model="gpt2-tiny", batch_tokens=128, micro_batch=4, context=32, eval_every=3, eval_batches=2,
             log_every=1, warmup_steps=1, lr=3e-3, device="cpu", precision="fp32")


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**SMALL, **kw})


def _tiny_model(block_size: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(name="tiny", family="gpt2", n_layer=1, n_head=2, n_embd=16, block_size=block_size,
                           vocab_size=50257, tokenizer="gpt2"))


# -- the run directory ---------------------------------------------------------------------------------
def test_rundir_owns_config_metrics_checkpoints_pointers_and_summary(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config({"model": "m", "adapter": {"rank": 4}})
    assert run.read_config()["adapter"] == {"rank": 4}
    for step in (1, 2, 3):
        run.log({"step": step, "train_loss": 1.0 / step})
    run.truncate_metrics(2)
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
    for step in (2, 4, 6):
        run.save_checkpoint(step, lambda d: (d / "w.txt").write_text("x"), {"step": step}, {"rng": torch.zeros(1)},
                            is_best=step == 2, keep=1)
    assert run.checkpoint("latest") == run.step_dir(6) and run.checkpoint("best") == run.step_dir(2)
    assert sorted(p.name for p in run.checkpoints_dir.glob("step-*")) == ["step-0000002", "step-0000006"]
    state, saved = run.read_trainer_state(run.step_dir(6))
    assert state == {"step": 6} and torch.equal(saved["rng"], torch.zeros(1))
    assert is_run_dir(run.path) and resolve_checkpoint(run.path) == run.step_dir(2)
    assert run_of_step(run.step_dir(6)).path == run.path
    run.write_summary({"steps": 6})
    assert run.read_summary() == {"steps": 6}
    assert not list(run.path.rglob("*.tmp"))  # every write swapped into place


def test_a_run_without_checkpoints_says_so(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no checkpoint yet"):
        resolve_checkpoint(tmp_path / "run")


def test_only_rundir_builds_run_paths():
    """No other module spells the run directory's file names (metrics.jsonl, config.yaml, ...)."""
    root = Path(__file__).resolve().parents[1] / "pocketlm"
    names = ('"metrics.jsonl"', '"config.yaml"', '"summary.json"', '"samples.jsonl"', '"trainer_state.json"',
             '"lr_search.json"', '"checkpoints"')
    offenders = [f"{p.relative_to(root)}: {n}" for p in root.rglob("*.py") if p.name != "rundir.py"
                 for n in names if n in p.read_text()]
    assert offenders == []


# -- the Trainer, step by step -------------------------------------------------------------------------
def test_step_by_step_equals_train(tiny_data, tmp_path):
    model, tok = build_model("gpt2-tiny", str(tiny_data), 1337)
    summary = Trainer(model, tok, _cfg(tiny_data, tmp_path / "a", max_steps=4)).train()
    model, tok = build_model("gpt2-tiny", str(tiny_data), 1337)
    trainer = Trainer(model, tok, _cfg(tiny_data, tmp_path / "b", max_steps=4))
    trainer.setup()
    losses = [trainer.step()["train_loss"] for _ in range(4)]
    rows = RunDir(tmp_path / "a").read_metrics()
    assert trainer.evaluate()["val_loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-6)
    trainer.cleanup()
    assert losses == [r["train_loss"] for r in rows] and summary["steps"] == 4


class _ScaledLM(LMObjective):
    """A custom objective: twice the LM loss (so its effect on the logged loss is exact)."""

    def __init__(self) -> None:
        self.set_up_on = None

    def setup(self, trainer) -> None:
        self.set_up_on = trainer.device

    def loss(self, model, batch):
        return 2.0 * super().loss(model, batch)


class _TokenAccuracy:
    """A higher-is-better validation metric: next-token accuracy on the validation windows."""

    name = "val_accuracy"
    higher_is_better = True

    @torch.no_grad()
    def evaluate(self, trainer, context):
        hits = total = 0
        for x, y in trainer.batch_source.val_batches(context, trainer.cfg.eval_batches, trainer.cfg.micro_batch):
            logits, _ = trainer.model(x)
            hits += (logits.argmax(-1) == y).sum().item()
            total += y.numel()
        return {self.name: hits / total, "val_tokens": total}


def test_extension_points_objective_metric_prepare_and_summary(tiny_data, tmp_path):
    model, tok = build_model("gpt2-tiny", str(tiny_data), 1337)
    plain = Trainer(model, tok, _cfg(tiny_data, tmp_path / "plain", max_steps=1))
    plain.setup()
    first = plain.step()["train_loss"]

    calls = []

    def freeze_embeddings(m, cfg):
        calls.append(next(m.parameters()).device.type)  # before the optimizer, on the CPU
        m.transformer.wpe.weight.requires_grad_(False)

    model, tok = build_model("gpt2-tiny", str(tiny_data), 1337)
    objective = _ScaledLM()
    trainer = Trainer(model, tok, _cfg(tiny_data, tmp_path / "run", max_steps=6), objective=objective,
                      metric=_TokenAccuracy(), prepare_model=freeze_embeddings,
                      extra_summary=lambda t: {"objective": "scaled", "at_step": t.state["step"]})
    summary = trainer.train()
    rows = RunDir(tmp_path / "run").read_metrics()
    assert rows[0]["train_loss"] == pytest.approx(2 * first, rel=1e-5)
    assert objective.set_up_on == torch.device("cpu") and calls == ["cpu"]
    assert all(p is not model.transformer.wpe.weight for g in trainer.optimizer.param_groups for p in g["params"])
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(r["val_tokens"] == 2 * 4 * 32 for r in evals)
    best = max(evals, key=lambda r: r["val_accuracy"])
    assert summary["best_metric"] == "val_accuracy" and summary["best_step"] == best["step"]
    assert summary["best_val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)
    assert summary["objective"] == "scaled" and summary["at_step"] == 6
    assert RunDir(tmp_path / "run").checkpoint("best").name == f"step-{best['step']:07d}"


def test_higher_is_better_metric_drives_best_and_patience(tiny_data, tmp_path):
    model, tok = build_model("gpt2-tiny", str(tiny_data), 1337)
    trainer = Trainer(model, tok, _cfg(tiny_data, tmp_path / "run", patience=2), metric=_TokenAccuracy())
    trainer.setup()
    outcomes = []
    for value in (0.1, 0.3, 0.2, 0.25):
        outcomes.append((trainer.record_evaluation({"val_accuracy": value}), trainer.stopped_early))
    assert outcomes == [(True, False), (True, False), (False, False), (False, True)]
    assert trainer.state["best_val_accuracy"] == 0.3


def test_custom_batch_source_resumes_exactly(tmp_path):
    """In-memory windows through the batch-source extension point: a resumed run's losses equal the
    uninterrupted run's (the data position is all a resume restores)."""
    tok = load_tokenizer("gpt2")
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 50257, (6, 2, 17), generator=g)

    def run(out: Path, steps: int, resume: bool = False) -> list[float]:
        trainer = trainer_on_windows(_tiny_model(), tok, windows, out=out, lr=1e-2, steps=6, device="cpu",
                                     precision="fp32", save_every=1, eval_every=100, resume=resume)
        losses = [trainer.step()["train_loss"] for _ in range(steps)]
        trainer.save()
        trainer.cleanup()
        return losses

    full = run(tmp_path / "full", 6)
    assert run(tmp_path / "cut", 3) == full[:3]
    assert run(tmp_path / "cut", 3, resume=True) == full[3:]


# -- recipes: adapter settings, derived shapes ----------------------------------------------------------
def test_adapter_settings_live_in_the_recipe_and_in_config_yaml(tiny_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nadapter: {rank: 4, alpha: 8, targets: attn+mlp}\n")
    cfg = load_recipe(str(recipe), {"adapter": {"rank": 2, "alpha": None}})
    assert cfg.adapter == AdapterConfig(rank=2, alpha=8, targets="attn+mlp", dropout=0.0)
    recipe.write_text("adapter: {rank: 4, size: 3}\n")
    with pytest.raises(UserError, match="unknown keys"):
        load_recipe(str(recipe))
    assert "adapter" not in TrainConfig(method="full").to_dict()

    base = tmp_path / "base"
    from pocketlm.io import save_model

    save_model(_tiny_model(), load_tokenizer("gpt2"), base)
    run = tmp_path / "run"
    main(["finetune", "--base", str(base), "--data", str(tiny_data), "--method", "lora", "--rank", "4",
          "--alpha", "8", "--targets", "attn+mlp", "--max-steps", "2", "--out", str(run), "--device", "cpu",
          "--precision", "fp32", "--context", "32", "--micro-batch", "4", "--batch-tokens", "128"])
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["adapter"] == {"rank": 4, "alpha": 8.0, "targets": "attn+mlp", "dropout": 0.0}
    adapter = json.loads((run / "checkpoints" / "step-0000002" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8


def test_unset_context_and_batch_are_derived_consistently():
    cfg = TrainConfig(data="d", micro_batch=8)
    on_cpu, note = derive_batch_shape(cfg, 8192, "cpu")
    assert on_cpu.context == 512 and on_cpu.batch_tokens == 8192 and "context 512" in note
    on_gpu, _ = derive_batch_shape(cfg, 8192, "cuda")
    assert on_gpu.context == 8192 and on_gpu.batch_tokens == 8192 * 8  # one micro-batch at least
    given, note = derive_batch_shape(TrainConfig(data="d", context=64, batch_tokens=1024), 8192, "cpu")
    assert (given.context, given.batch_tokens, note) == (64, 1024, None)
    scheduled, _ = derive_batch_shape(TrainConfig(data="d", micro_batch=2, context_schedule=[[0, 96], [5, 128]]),
                                      8192, "cpu", world=2)
    assert scheduled.batch_tokens % (96 * 2 * 2) == 0 and scheduled.batch_tokens % (128 * 2 * 2) == 0


def test_finetune_with_no_shape_flags_works_on_a_cpu_and_says_what_it_chose(tiny_data, tmp_path, capsys):
    """The newcomer's command: a base with an 8,192-token context, no --context/--batch-tokens."""
    from pocketlm.io import save_model

    base = tmp_path / "base"
    save_model(_tiny_model(block_size=8192), load_tokenizer("gpt2"), base)
    run = tmp_path / "run"
    main(["finetune", "--base", str(base), "--data", str(tiny_data), "--method", "lora", "--out", str(run),
          "--max-steps", "1", "--device", "cpu", "--micro-batch", "2"])
    err = capsys.readouterr().err
    assert "context 512 (the model's 8192 is slow on a CPU" in err and "batch 8192 tokens" in err
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["context"] == 512 and recorded["batch_tokens"] == 8192
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


# -- help and warnings ----------------------------------------------------------------------------------
def _every_command() -> list[str]:
    from pocketlm.cli import COMMAND_MODULES

    return COMMAND_MODULES + ["study run", "study report", "study list"]


@pytest.mark.parametrize("command", _every_command())
def test_help_never_says_default_none(command):
    out = subprocess.run([sys.executable, "-m", "pocketlm", *command.split(), "--help"], capture_output=True,
                         text=True, env={"COLUMNS": "200", "PATH": "", "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    for empty in ("(default: None)", "(default: False)", "(default: )", "(default: [])"):
        assert empty not in out.stdout, f"pocketlm {command} --help says {empty}"


def test_finetune_help_shows_effective_defaults():
    out = subprocess.run([sys.executable, "-m", "pocketlm", "finetune", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "300", "PATH": "", "PYTHONPATH": str(Path(__file__).parents[1])}).stdout
    flat = " ".join(out.split())
    assert "adapter rank (default: 8)" in flat and "peak learning rate (default: 0.0006;" in flat
    assert "(default: 8192, rounded to whole micro-batches" in flat


def test_lr_search_at_the_edge_of_its_grid_says_so():
    from pocketlm.finetune import edge_advice, grid_edge

    assert grid_edge(3e-3, [1e-3, 3e-3, 1e-4]) == "largest"
    assert grid_edge(1e-4, [1e-3, 3e-3, 1e-4]) == "smallest"
    assert grid_edge(1e-3, [1e-3, 3e-3, 1e-4]) is None and grid_edge(1e-3, [1e-3]) is None
    advice = edge_advice(3e-3, [1e-4, 1e-3, 3e-3], "largest")
    assert "largest" in advice and "--lr-search 0.0001,0.001,0.003,0.009" in advice


def test_compiled_blocks_train_as_the_eager_blocks_with_one_graph_for_all(tmp_path):
    """--compile-blocks: the same losses and adapter weights as eager, graphs shared by the blocks, and
    evaluation runs the eager blocks (no graph of its own)."""
    from torch._dynamo.utils import counters

    from pocketlm import lora

    tok = load_tokenizer("smollm2")
    config = ModelConfig(name="tiny-llama", family="llama", n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                         intermediate_size=64, block_size=64, vocab_size=tok.vocab_size, bias=False,
                         tokenizer="smollm2")
    windows = torch.randint(0, tok.vocab_size, (3, 2, 17), generator=torch.Generator().manual_seed(0))

    def trainer(out: Path, **settings) -> Trainer:
        torch.manual_seed(0)
        model = GPT(config)
        lora.prepare_model(model, "lora", 4, 8, 0.0, "all-linear")
        return trainer_on_windows(model, tok, windows, val_windows=windows[:1], out=out, lr=1e-2, steps=3,
                                  device="cpu", precision="fp32", **settings)

    eager = trainer(tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = trainer(tmp_path / "compiled", compile_blocks=True)
    assert [compiled.step()["train_loss"] for _ in range(3)] == pytest.approx(
        [eager.step()["train_loss"] for _ in range(3)], rel=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # not one per block: the first block's input needs no grad (frozen embedding), the rest do
    trained = dict(compiled.model.named_parameters())
    for name, p in eager.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(trained[name], p, rtol=1e-4, atol=1e-5)
    assert compiled.evaluate()["val_loss"] == pytest.approx(eager.evaluate()["val_loss"], rel=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    for t in (eager, compiled):
        t.cleanup()
    with pytest.raises(UserError, match="choose one"):
        TrainConfig(compile=True, compile_blocks=True).validate(require_data=False)
