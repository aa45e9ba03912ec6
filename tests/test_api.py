"""The library calls behind the commands (`import pocketlm`), optional TensorBoard / W&B logging, and the
generate command's output lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pocketlm
from pocketlm.recipe import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(model="gpt2-tiny", batch_tokens=128, micro_batch=4, context=32, eval_every=2, eval_batches=1,
             log_every=1, warmup_steps=1, lr=3e-3, device="cpu", precision="fp32", max_steps=2)


def test_pretrain_load_and_export_from_python(tiny_data, tmp_path):
    summary = pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), **SMALL), log=lambda _m: None)
    assert summary["steps"] == 2 and summary["method"] == "pretrain"
    model, tokenizer = pocketlm.load_model(tmp_path / "run")
    assert model.config.name == "gpt2-tiny" and tokenizer.name == "gpt2"
    out = pocketlm.export(tmp_path / "run", tmp_path / "exported")
    again, _ = pocketlm.load_model(out)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert pocketlm.load_tokenizer(out).identity == tokenizer.identity
    with pytest.raises(AttributeError):
        pocketlm.no_such_call  # noqa: B018


def test_logging_is_off_by_default_and_tensorboard_writes_events(tiny_data, tmp_path):
    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "plain"), **SMALL), log=lambda _m: None)
    assert not (tmp_path / "plain" / "tensorboard").exists() and not (tmp_path / "plain" / "wandb").exists()
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "tb"), tensorboard=True, **SMALL),
                      log=lambda _m: None)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train_loss")]
    logged = [json.loads(x)["train_loss"] for x in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(logged) and "val_loss" in events.Tags()["scalars"]


def test_wandb_logs_offline_through_its_library(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "wb"), wandb_project="pocketlm-test",
                                  **SMALL), log=lambda _m: None)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_generate_ends_its_output_and_its_speed_line_with_newlines(tiny_data, tmp_path):
    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), **SMALL), log=lambda _m: None)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "POCKETLM_ALLOCATOR": "glibc"}
    out = subprocess.run([sys.executable, "-m", "pocketlm", "generate", str(tmp_path / "run"), "--prompt", "ROMEO:",
                          "--max-new-tokens", "5", "--device", "cpu"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n")
    speed = [line for line in out.stderr.splitlines(keepends=True) if "tokens/s" in line]
    assert len(speed) == 1 and speed[0].endswith("\n")
