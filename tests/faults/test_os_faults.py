"""The operating system says no: a full disk and a read-only folder, each a tmpfs in a private mount
namespace (root and `unshare -m`; skipped elsewhere), so the machine's own disks are never filled."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.faults.conftest import TRAIN_FLAGS
from tests.faults.harness import assert_ok, assert_user_error, can_mount, in_small_disk, run_process, snapshot

pytestmark = pytest.mark.skipif(not can_mount(), reason="needs root and unshare -m (private tmpfs mounts)")


def _after(mount: Path, into: Path) -> Path:
    """What the tmpfs held when the command ended (in_small_disk tars it beside the mount point)."""
    into.mkdir()
    with tarfile.open(f"{mount}.after.tar") as tar:
        tar.extractall(into, filter="tar")
    return into


def _du(folder: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(folder)], capture_output=True, text=True).stdout.split()[0])


def test_prepare_on_a_full_disk_keeps_the_old_data_set(corpus, data, tmp_path):
    old = tmp_path / "seed" / "data"
    shutil.copytree(data, old)
    size = _du(old) + 1_000_000  # room for the old data set, not for GPT-2's 3.5 MB tokenizer.json beside it
    mount = tmp_path / "disk"
    r = in_small_disk(mount, str(size), ["prepare", corpus, "--out", mount / "data", "--tokenizer", "gpt2",
                                         "--min-val-tokens", "65", "--no-progress"], seed_from=tmp_path / "seed")
    assert_user_error(r, "prepare", "no space left")
    after = _after(mount, tmp_path / "after")
    assert snapshot(after / "data") == snapshot(old)
    assert sorted(p.name for p in after.iterdir()) == ["data"]  # no temporary folder left on the disk


def test_prepare_into_a_read_only_folder(corpus, tmp_path):
    mount = tmp_path / "ro"
    r = in_small_disk(mount, "4m", ["prepare", corpus, "--out", mount / "data", "--min-val-tokens", "65"],
                      read_only=True)
    assert_user_error(r, "prepare", "not writable")


@pytest.mark.slow
def test_training_into_a_read_only_folder(data, tmp_path):
    mount = tmp_path / "ro"
    r = in_small_disk(mount, "4m", ["pretrain", "--model", "gpt2-tiny", "--data", data, "--max-steps", "2",
                                    "--out", mount / "run", *TRAIN_FLAGS], read_only=True)
    assert_user_error(r, "pretrain", "not writable")
    assert "%|" not in r.err


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_last_one_loadable(base, data, tmp_path):
    seed = tmp_path / "seed"
    argv = ["finetune", "--base", base, "--data", data, "--method", "full", "--max-steps", "4", "--out",
            seed / "run", *TRAIN_FLAGS]
    assert_ok(run_process(argv))
    step = seed / "run" / "checkpoints" / "step-0000004"
    size = _du(seed) + _du(step) // 2  # half a checkpoint of room: the next one cannot be written
    mount = tmp_path / "disk"
    argv = [*argv[:-len(TRAIN_FLAGS) - 2], "--out", mount / "run", *TRAIN_FLAGS, "--max-steps", "6", "--resume"]
    r = in_small_disk(mount, str(size), argv, seed_from=seed)
    assert_user_error(r, "finetune", "no space left")
    after = _after(mount, tmp_path / "after")
    assert (after / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert snapshot(after / "run" / "checkpoints" / "step-0000004") == snapshot(step)
    assert_ok(run_process(["generate", after / "run", "--prompt", "a", "--max-new-tokens", "2"]))
