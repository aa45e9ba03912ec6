"""torchrun with 2 CPU processes (gloo): the same losses as one process, checkpoints that move between
world sizes, FSDP2, and a failing rank that stops the run without leaving a broken checkpoint.

The model is gpt2-tiny on a 300-token BPE vocabulary (trained here), so each run takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pocketlm.cli import main
from pocketlm.distributed import accumulation_steps
from pocketlm.errors import UserError

STEPS = 4
TRAIN_ARGS = ["--model", "gpt2-tiny", "--seed", "7", "--device", "cpu", "--precision", "fp32",
              "--max-steps", str(STEPS), "--batch-tokens", "512", "--micro-batch", "2", "--context", "64",
              "--eval-every", "2", "--eval-batches", "2", "--log-every", "1", "--warmup-steps", "2",
              "--keep-checkpoints", "4"]
REL = 1e-5

# Rank 1 raises when it reaches global window FAIL_AT: with 8 windows per step, that is step 3.
FAILING_LAUNCHER = """
import os, sys
from pocketlm.data import batches

if os.environ.get("RANK") == "1":
    original = batches.Batches.get

    def get(self, position, count):
        if self.shuffle and position >= int(os.environ["FAIL_AT"]):
            raise RuntimeError("injected failure on rank 1")
        return original(self, position, count)

    batches.Batches.get = get

from pocketlm.cli import main
main(sys.argv[1:])
"""


def _torchrun(args: list[str], cwd: Path, nproc: int = 2, env: dict | None = None,
              timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_same_losses(rows: list[dict], reference: list[dict]) -> None:
    by_step = {r["step"]: r for r in reference}
    for row in rows:
        ref = by_step[row["step"]]
        assert row["tokens"] == ref["tokens"]  # the same global batch
        for key in ("train_loss", "val_loss"):
            if key in ref:
                assert row[key] == pytest.approx(ref[key], rel=REL), (row["step"], key)


def _assert_same_checkpoint(step_dir: Path, ref_dir: Path) -> None:
    """Same files, same weights, same optimizer state layout and values as the single-process checkpoint."""
    assert sorted(p.name for p in step_dir.iterdir()) == sorted(p.name for p in ref_dir.iterdir())
    weights, ref_weights = load_file(step_dir / "model.safetensors"), load_file(ref_dir / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=1e-5, msg=name)
    optim = torch.load(step_dir / "trainer_state.pt", weights_only=True)["optimizer"]
    ref_optim = torch.load(ref_dir / "trainer_state.pt", weights_only=True)["optimizer"]
    assert [g["params"] for g in optim["param_groups"]] == [g["params"] for g in ref_optim["param_groups"]]
    assert optim["state"].keys() == ref_optim["state"].keys()
    for index, values in ref_optim["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(optim["state"][index][key], value, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_data) -> Path:
    """~60 KB of Shakespeare, tokenized with a 300-token byte-level BPE (a small embedding keeps runs fast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pocketlm.data.prepare import prepare

    root = tmp_path_factory.mktemp("dist_data")
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    (root / "input.txt").write_text(text)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (root / "tok").mkdir()
    bpe.save(str(root / "tok" / "tokenizer.json"))
    prepare(root / "input.txt", root / "data", tokenizer=root / "tok", val_fraction=0.1, workers=1, progress=False)
    return root / "data"


@contextmanager
def _one_thread():
    """torchrun gives each worker one thread; so does the in-process reference (also far faster on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted single-process run every distributed run is compared with."""
    out = tmp_path_factory.mktemp("dist_ref") / "run"
    with _one_thread():
        main(["pretrain", *TRAIN_ARGS, "--data", str(data_dir), "--save-every", "2", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess, float]:
    """A 2-rank FSDP2 run whose rank 1 raises in step 3: (run dir, torchrun result, seconds it took)."""
    root = tmp_path_factory.mktemp("dist_fail")
    (root / "launch.py").write_text(FAILING_LAUNCHER)
    start = time.perf_counter()
    result = _torchrun(["launch.py", "pretrain", *TRAIN_ARGS, "--data", str(data_dir), "--save-every", "2",
                        "--out", "run", "--fsdp"], cwd=root, env={"FAIL_AT": "16"})
    return root / "run", result, time.perf_counter() - start


def test_two_ranks_give_the_losses_and_checkpoint_of_one_process(tmp_path, data_dir, reference):
    """`torchrun --nproc_per_node=2 -m pocketlm pretrain` (DDP) is the single-process run, twice as wide."""
    result = _torchrun(["-m", "pocketlm", "pretrain", *TRAIN_ARGS, "--data", str(data_dir), "--save-every", "2",
                        "--out", "run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rank 0 alone wrote metrics
    _assert_same_losses(rows, _rows(reference))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["tokens"] == STEPS * 512
    # Checkpoints are the single-process format: the same files, weights and optimizer state.
    _assert_same_checkpoint(run / "checkpoints" / "step-0000004", reference / "checkpoints" / "step-0000004")


def test_a_failing_rank_stops_the_run_and_leaves_only_whole_checkpoints(interrupted):
    run, result, seconds = interrupted
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert seconds < 200  # rank 0 did not wait for a collective that never comes
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000002"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-0000002"]  # no partial step-3
    assert [r["step"] for r in _rows(run)] == [1, 2]


def test_fsdp_gives_the_losses_and_checkpoint_of_one_process(reference, interrupted):
    """FSDP2 on CPU (gloo): sharded training, then a full state dict gathered on rank 0 for the checkpoint."""
    run = interrupted[0]
    _assert_same_losses(_rows(run), _rows(reference))
    _assert_same_checkpoint(run / "checkpoints" / "step-0000002", reference / "checkpoints" / "step-0000002")


def test_checkpoint_from_two_ranks_resumes_in_one_process(tmp_path, data_dir, reference, interrupted):
    run = tmp_path / "run"
    shutil.copytree(interrupted[0], run)
    with _one_thread():
        main(["pretrain", *TRAIN_ARGS, "--data", str(data_dir), "--save-every", "2", "--out", str(run),
              "--resume"])
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _assert_same_losses(rows, _rows(reference))
    _assert_same_checkpoint(run / "checkpoints" / "step-0000004", reference / "checkpoints" / "step-0000004")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_checkpoint_resumes_on_two_ranks(tmp_path, data_dir, reference, interrupted, fsdp):
    """Loading goes through FSDP2's set_optimizer_state_dict (or DDP's plain load) on 2 ranks."""
    run = tmp_path / "run"
    shutil.copytree(interrupted[0], run)
    result = _torchrun(["-m", "pocketlm", "pretrain", *TRAIN_ARGS, "--data", str(data_dir), "--save-every", "2",
                        "--out", str(run), "--resume", *(["--fsdp"] if fsdp else [])], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_losses(_rows(run), _rows(reference))
    _assert_same_checkpoint(run / "checkpoints" / "step-0000004", reference / "checkpoints" / "step-0000004")


@pytest.mark.slow
@pytest.mark.parametrize("method,wrap", [("lora", "ddp"), ("qlora", "fsdp"), ("full", "fsdp")])
def test_finetune_trains_the_same_on_two_ranks(tmp_path, data_dir, reference, method, wrap):
    """`torchrun -m pocketlm finetune`: frozen bases (float or NF4) with adapters, or full fine-tuning."""
    args = ["finetune", "--base", str(reference), "--method", method, "--data", str(data_dir), *TRAIN_ARGS[2:],
            "--max-steps", "3", "--warmup-steps", "1", "--targets", "all-linear",
            "--lora-dropout", "0", "--eval-every", "3", "--rank", "4"]
    with _one_thread():
        main([*args, "--out", str(tmp_path / "run1")])
    result = _torchrun(["-m", "pocketlm", *args, "--out", "run2", *(["--fsdp"] if wrap == "fsdp" else [])],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows, ref_rows = _rows(tmp_path / "run2"), _rows(tmp_path / "run1")
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3]
    _assert_same_losses(rows, ref_rows)
    name = "adapter/adapter_model.safetensors" if method != "full" else "model.safetensors"
    # (A large --lr would break weight equality, not loss equality: the key bias has a true gradient of 0, and
    # Adam scales its rounding noise up to +-lr per step.)
    weights = [load_file(tmp_path / run / "checkpoints" / "step-0000003" / name) for run in ("run1", "run2")]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-4, atol=1e-5, msg=key)


def test_global_batch_must_divide_by_ranks_micro_batch_and_context():
    assert accumulation_steps(512, 64, 2, 1) == 4
    assert accumulation_steps(512, 64, 2, 2) == 2  # twice the ranks, half the accumulation: same global batch
    with pytest.raises(UserError, match=r"context 64 x micro-batch 2 x 3 ranks = 384: use a multiple of 384"):
        accumulation_steps(512, 64, 2, 3)
    with pytest.raises(UserError, match="use a multiple of 128"):
        accumulation_steps(500, 64, 2, 1)


def test_indivisible_batch_is_a_cli_error(tmp_path, data_dir, capsys):
    args = [a if a != "512" else "500" for a in TRAIN_ARGS]
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", *args, "--data", str(data_dir), "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "batch-tokens 500 is not divisible" in capsys.readouterr().err
