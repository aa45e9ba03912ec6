"""Running studies with a tiny model: exact resume after a kill, failed cells, DIR ownership, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pocketlm.errors import UserError
from pocketlm.study import run_study
from pocketlm.study.results import read_results

REPO = Path(__file__).resolve().parents[1]
STUDY = """\
study: tiny-{name}
data:
  source: {corpus}
base:
  max_steps: 12
  batch_tokens: 1024  # two micro-batches: accumulation is resumed too
  micro_batch: 8
  context: 64
  eval_every: 4
  eval_batches: 2
  save_every: 2
  log_every: 1
  warmup_steps: 2
  precision: fp32
  lr: 1.0e-3
axes:
{axes}
measures:
  - val_loss: {{max_tokens: 512}}
  - bits_per_byte
"""
CHAIN = """\
  stage:
    - {name: scratch, method: pretrain, arch: gpt2-tiny}
    - {name: lora, method: lora, base: "cell:scratch", rank: 2, max_steps: 4}
"""
# Deterministic: everything but timings, memory and speeds.
STABLE = ("cell", "status", "knobs", "repeat", "seed", "method", "run_dir", "trainable_params", "parameters",
          "steps", "best_val_loss", "stopped_early", "size_bytes", "val_loss", "perplexity", "bits_per_byte",
          "val_tokens")


def _study(tmp_path: Path, corpus: Path, axes: str, name: str = "a") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, corpus=corpus, axes=axes))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "POCKETLM_ALLOCATOR": "glibc"}


def _losses(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in rows]


def test_kill_then_rerun_equals_an_uninterrupted_study(tmp_path, tiny_text):
    study = _study(tmp_path, tiny_text, CHAIN)
    straight = run_study(str(study), tmp_path / "straight", threads=1, progress=False)
    assert [r["status"] for r in straight] == ["ok", "ok"]

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pocketlm", "study", "run", str(study), "--out", str(out), "--threads", "1",
           "--no-report"]
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = out / "scratch" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-0000004"):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its cell worker, mid-cell
    proc.wait()
    time.sleep(0.5)  # the worker's watchdog ends it within 0.2 s if it survived the group kill
    assert latest.exists(), "the cell never checkpointed"
    assert not (out / "scratch" / "cell.json").exists(), "the cell finished before the kill: nothing tested"

    resumed = run_study(str(study), out, threads=1, progress=False)
    assert "resuming" in (out / "scratch" / "cell.log").read_text()
    for cell in ("scratch", "lora"):
        assert _losses(out / cell) == _losses(tmp_path / "straight" / cell)
    assert [{k: r.get(k) for k in STABLE} for r in resumed] == [{k: r.get(k) for k in STABLE} for r in straight]
    assert [{k: r.get(k) for k in STABLE} for r in read_results(out)] == \
        [{k: r.get(k) for k in STABLE} for r in straight]


def test_a_failed_cell_is_recorded_and_the_study_goes_on(tmp_path, tiny_text):
    axes = ("  stage:\n    - {name: scratch, method: pretrain, arch: gpt2-tiny, max_steps: 2}\n"
            "    - {name: bad-targets, method: lora, base: 'cell:scratch', targets: no_such_layer, max_steps: 2}\n"
            "    - {name: after, method: full, base: 'cell:scratch', max_steps: 2}\n")
    study = _study(tmp_path, tiny_text, axes, "f")
    out = tmp_path / "out"
    rows = run_study(str(study), out, threads=1, progress=False)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "no_such_layer" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert "Traceback" in (out / "bad-targets" / "cell.log").read_text()
    assert (out / "after" / "summary.json").exists()  # an ordinary run directory
    csv_text = (out / "results.csv").read_text()
    assert csv_text.splitlines()[0].startswith("cell,status,knob.method")
    # Another study's results are refused before anything runs.
    other = _study(tmp_path, tiny_text, "  rank: [1]\n", "other")
    with pytest.raises(UserError, match=r"holds results of study 'tiny-f'"):
        run_study(str(other), out, progress=False)
    # A rerun keeps the failure (nothing recomputed); --retry-failed tries again.
    again = run_study(str(study), out, threads=1, progress=False)
    assert again == rows
    retried = run_study(str(study), out, threads=1, progress=False, retry_failed=True)
    assert retried[1]["status"] == "failed" and retried[1]["cell_s"] != rows[1]["cell_s"]
    assert retried[0] == rows[0]


def test_cli_list_dry_run_and_one_line_errors(tmp_path, tiny_text, shared_data):
    env = {**_env(), "POCKETLM_SHARED_DATA": str(shared_data)}
    run = [sys.executable, "-m", "pocketlm", "study"]
    listing = subprocess.run([*run, "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "seed-003-fantasy" in listing.stdout
    dry = subprocess.run([*run, "run", "seed-001-sonnet-knobs", "--quick", "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0 and "5 cells" in dry.stdout
    bad = _study(tmp_path, tiny_text, "  rank: [1, 0]\n  method: [lora]\n", "bad")
    result = subprocess.run([*run, "run", str(bad), "--out", str(tmp_path / "never")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pocketlm study: error: ") and "line 17, axes.rank[1]" in last
    assert "Traceback" not in result.stderr and not (tmp_path / "never").exists()


def test_preempt_at_kills_training_and_resumes_it_exactly(tmp_path, tiny_text):
    axes = ("  stage:\n    - {name: straight, method: pretrain, arch: gpt2-tiny, max_steps: 8}\n"
            "    - {name: preempted, method: pretrain, arch: gpt2-tiny, max_steps: 8, preempt_at: 4}\n")
    rows = run_study(str(_study(tmp_path, tiny_text, axes, "p")), tmp_path / "out", threads=1, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[1]["preempted_after_step"] >= 4 and "preempted_after_step" not in rows[0]
    assert "resuming" in (tmp_path / "out" / "preempted" / "cell.log").read_text()
    assert _losses(tmp_path / "out" / "preempted") == _losses(tmp_path / "out" / "straight")
    assert rows[1]["val_loss"] == rows[0]["val_loss"]


def test_compression_axis_and_zero_shot_probe(tmp_path, tiny_text, shared_data, monkeypatch):
    monkeypatch.setenv("POCKETLM_SHARED_DATA", str(shared_data))
    axes = ("  stage:\n    - {name: scratch, method: pretrain, arch: gpt2-tiny, max_steps: 2}\n"
            "    - {name: float, method: full, base: 'cell:scratch', max_steps: 2}\n"
            "    - {name: int8, method: none, base: 'cell:float', quantize: int8}\n"
            "    - {name: qat-int8, method: full, base: 'cell:scratch', max_steps: 2, qat: int8, quantize: int8}\n")
    study = _study(tmp_path, tiny_text, axes, "c")
    study.write_text(study.read_text() + "  - zero_shot: {probe: sentiment, limit: 12}\n")
    rows = run_study(str(study), tmp_path / "out", threads=1, progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 4, [r.get("error") for r in rows]
    by = {r["cell"]: r for r in rows}
    # `none`: the float cell's model as it is, quantized after the fact; no training of its own
    assert by["int8"]["trainable_params"] == 0 and "steps" not in by["int8"]
    assert by["int8"]["size_bytes_trained"] == by["float"]["size_bytes"]
    assert by["int8"]["size_bytes"] < by["float"]["size_bytes"] / 2  # int8 codes instead of fp32
    assert abs(by["int8"]["val_loss"] - by["float"]["val_loss"]) < 0.05
    assert (tmp_path / "out" / "int8" / "quantized-int8" / "pocketlm.json").exists()
    assert by["float"]["val_loss"] != by["int8"]["val_loss"]  # measured on the quantized model
    assert (tmp_path / "out" / "qat-int8" / "checkpoints").exists()
    assert all(0 <= r["zero_shot_acc"] <= 1 and r["zero_shot_examples"] == 12 for r in rows)
    # quantizing is the cell's work: timed as post_training_s, not counted as study overhead
    assert by["int8"]["post_training_s"] > 0 and by["float"]["post_training_s"] < by["int8"]["post_training_s"]
    for r in rows:
        work = r["prepare_s"] + r["train_s"] + r["post_training_s"] + r["measure_s"]
        assert abs(r["overhead_s"] - max(0.0, r["cell_s"] - work)) < 2e-3
