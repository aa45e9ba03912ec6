"""A run directory that a crash, a full disk or a user left damaged: `--resume` recovers from what is valid
and never overwrites it, a damaged checkpoint is one line (and changes nothing), and the run is locked."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from tests.faults.conftest import TRAIN_FLAGS
from tests.faults.harness import CORRUPTIONS, assert_ok, assert_user_error, run_inprocess, snapshot


# -- a run directory ----------------------------------------------------------------------------------------
def _finetune(base, data, out, *extra):
    return ["finetune", "--base", base, "--data", data, "--method", "full", "--max-steps", "6", "--out", out,
            "--keep-checkpoints", "5", *TRAIN_FLAGS, *extra]


def _losses(run):
    return [(r["step"], r["train_loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base, data):
    """An uninterrupted 6-step run's losses, and that run as a kill after step 4's checkpoint leaves it:
    step-0000006 gone, both pointers on step-0000004, metrics.jsonl with rows past it."""
    folder = tmp_path_factory.mktemp("reference")
    whole = folder / "whole"
    assert_ok(run_inprocess(_finetune(base, data, whole)))
    cut = folder / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    for pointer in ("latest", "best"):
        (cut / "checkpoints" / pointer).write_text("step-0000004")
    (cut / "summary.json").unlink()
    return _losses(whole), cut


@pytest.fixture
def full_run(reference, tmp_path):
    """(the uninterrupted losses, a private copy of the run stopped at step 4) to damage and resume."""
    losses, cut = reference
    shutil.copytree(cut, tmp_path / "cut")
    return losses, tmp_path / "cut"


def _resume(base, data, run):
    return _finetune(base, data, run, "--resume")


def test_dangling_latest_pointer_recovers_from_the_newest_step(base, data, capsys, full_run):
    losses, run = full_run
    shutil.rmtree(run / "checkpoints" / "step-0000004")  # latest names nothing now
    r = run_inprocess(_resume(base, data, run), capsys)
    assert_ok(r)
    assert _losses(run) == losses  # resumed from step 2, the newest valid step: nothing lost, nothing twice


@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_damaged_latest_pointer_recovers(base, data, capsys, full_run, damage):
    losses, run = full_run
    CORRUPTIONS[damage](run / "checkpoints" / "latest")
    assert_ok(run_inprocess(_resume(base, data, run), capsys))
    assert _losses(run) == losses


def test_a_plain_rerun_never_overwrites_a_run_with_a_dangling_pointer(base, data, capsys, full_run):
    _, run = full_run
    (run / "checkpoints" / "latest").write_text("step-0000099")
    before = snapshot(run)
    r = run_inprocess(_finetune(base, data, run), capsys)
    assert_user_error(r, "finetune", "--resume")
    assert snapshot(run) == {**before, "checkpoints/latest": before["checkpoints/latest"]}


@pytest.mark.parametrize("file,damage", [("trainer_state.json", "truncate"), ("trainer_state.json", "garbage"),
                                         ("trainer_state.json", "wrong_json_shape"), ("trainer_state.pt", "truncate"),
                                         ("trainer_state.pt", "garbage"), ("model.safetensors", "truncate")])
def test_damaged_checkpoint_refuses_resume_and_keeps_config(base, data, capsys, full_run, file, damage):
    _, run = full_run
    CORRUPTIONS[damage](run / "checkpoints" / "step-0000004" / file)
    before = snapshot(run)
    r = run_inprocess([*_resume(base, data, run), "--lr", "1e-2"], capsys)
    assert_user_error(r, "finetune", "step-0000004")
    assert snapshot(run) == before  # config.yaml not rewritten with the new flags, metrics untouched


def test_half_written_metrics_line_is_tolerated(base, data, capsys, full_run):
    losses, run = full_run
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "tokens": 6')  # a crash in the middle of an append
    assert_ok(run_inprocess(_resume(base, data, run), capsys))
    assert _losses(run) == losses


def test_killed_before_the_first_checkpoint_then_resumed(base, data, capsys, full_run, tmp_path):
    losses, _ = full_run
    run = tmp_path / "early"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.9}\n')  # logged, never checkpointed
    assert_ok(run_inprocess(_resume(base, data, run), capsys))
    assert _losses(run) == losses  # no duplicate step rows


def test_leftover_temporary_checkpoints_are_cleaned(base, data, capsys, full_run):
    _, run = full_run
    junk = run / "checkpoints" / ".step-0000006.abcd1234.tmp"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\0" * 1000)
    assert_ok(run_inprocess(_resume(base, data, run), capsys))
    assert not junk.exists()


def test_a_run_directory_is_locked_while_it_trains(base, data, capsys, tmp_path):
    from pocketlm.rundir import RunDir

    run = tmp_path / "locked"
    with RunDir(run).lock():
        r = run_inprocess(_finetune(base, data, run), capsys)
    assert_user_error(r, "finetune", "another")
    assert not (run / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base, data, capsys, tmp_path, monkeypatch):
    from pocketlm.model import GPT

    forward, calls = GPT.forward, [0]

    def poisoned(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if self.training and loss is not None:
            calls[0] += 1
            if calls[0] > 2 * 2:  # micro-batches of steps 1-2 are fine (2 each), step 3 goes NaN
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    run = tmp_path / "nan"
    r = run_inprocess(_finetune(base, data, run), capsys)
    assert_user_error(r, "finetune", "step 3")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert not (run / "checkpoints" / "step-0000003").exists()
    monkeypatch.setattr(GPT, "forward", forward)
    assert_ok(run_inprocess(["generate", run, "--prompt", "a", "--max-new-tokens", "2"], capsys))


@pytest.mark.parametrize("pointer", ["dangling", "empty"])
def test_loaders_use_the_newest_complete_step_when_pointers_are_lost(full_run, capsys, pointer):
    _, run = full_run
    for name in ("latest", "best"):
        (run / "checkpoints" / name).write_text("step-0000099" if pointer == "dangling" else "")
    r = run_inprocess(["generate", run, "--prompt", "a", "--max-new-tokens", "2"], capsys)
    assert_ok(r)
    assert "no checkpoint yet" not in r.err


def test_a_run_whose_step_folders_are_all_damaged_says_so(full_run, capsys):
    _, run = full_run
    for step in run.glob("checkpoints/step-*"):
        (step / "trainer_state.json").write_text("{")
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "best").unlink()
    r = run_inprocess(["generate", run, "--prompt", "a"], capsys)
    assert_user_error(r, "generate", "none is a complete checkpoint")
