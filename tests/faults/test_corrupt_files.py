"""Every file pocketlm reads, damaged the way a crash or a user damages it: one line, exit 2, nothing else
damaged; and a run whose files a crash left behind resumes instead of starting over."""

from __future__ import annotations

import json

import pytest

from tests.faults.conftest import TRAIN_FLAGS
from tests.faults.harness import (
    BINARY_CORRUPTIONS,
    CORRUPTIONS,
    assert_user_error,
    odd_length,
    run_inprocess,
    snapshot,
)

# -- a prepared data set ------------------------------------------------------------------------------------
MANIFEST_DAMAGE = {
    **CORRUPTIONS,
    "no_splits": lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                                    if k != "splits"})),
    "splits_not_a_mapping": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "splits": [1, 2]})),
    "shard_path_escapes": lambda p: p.write_text(json.dumps(_with_shard(json.loads(p.read_text()), "../x.bin"))),
    "newer_format": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format": "pocketlm.tokens.v9"})),
}


def _with_shard(manifest: dict, name: str) -> dict:
    manifest["splits"]["train"]["shards"][0]["file"] = name
    return manifest


def _pretrain(data, out):
    return ["pretrain", "--model", "gpt2-tiny", "--data", data, "--max-steps", "2", "--out", out, *TRAIN_FLAGS]


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest(data, copy_of, tmp_path, capsys, damage):
    d = copy_of(data)
    MANIFEST_DAMAGE[damage](d / "manifest.json")
    before = snapshot(d)
    r = run_inprocess(_pretrain(d, tmp_path / "run"), capsys)
    assert_user_error(r, "pretrain", "manifest.json" if damage != "missing" else "not a prepared data set")
    if damage == "newer_format":
        assert "newer pocketlm" in r.last_err_line
    assert snapshot(d) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "missing", "odd_length"])
@pytest.mark.parametrize("command", ["pretrain", "eval"])
def test_damaged_shard(data, copy_of, tmp_path, capsys, damage, command, runs):
    d = copy_of(data)
    shard = d / "train_000000.bin"
    (odd_length if damage == "odd_length" else BINARY_CORRUPTIONS[damage])(shard)
    argv = _pretrain(d, tmp_path / "run") if command == "pretrain" else [
        "eval", runs("pretrain", capsys), "--data", d, "--split", "train", "--max-tokens", "64"]
    r = run_inprocess(argv, capsys)
    assert_user_error(r, command, "train shard")


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "wrong_json_shape"])
def test_damaged_tokenizer_file(corpus, base, copy_of, tmp_path, capsys, damage):
    b = copy_of(base)
    CORRUPTIONS[damage](b / "tokenizer.json")
    r = run_inprocess(["prepare", corpus, "--out", tmp_path / "d", "--tokenizer", b / "tokenizer.json"], capsys)
    assert_user_error(r, "prepare", "tokenizer")
    r = run_inprocess(["prepare", corpus, "--out", tmp_path / "d", "--tokenizer", b], capsys)
    assert_user_error(r, "prepare", "tokenizer")
    assert not (tmp_path / "d").exists()


# -- a model folder -----------------------------------------------------------------------------------------
MODEL_FILES = {"config.json": CORRUPTIONS, "model.safetensors": BINARY_CORRUPTIONS,
               "tokenizer.json": CORRUPTIONS, "tokenizer_config.json": {"truncate": CORRUPTIONS["truncate"],
                                                                        "garbage": CORRUPTIONS["garbage"]}}
MODEL_CASES = [(f, d) for f, damages in MODEL_FILES.items() for d in damages
               if not (f == "tokenizer.json" and d == "missing")]  # no tokenizer.json: the named one is used


@pytest.mark.parametrize("file,damage", MODEL_CASES)
def test_damaged_model_folder(base, copy_of, capsys, tmp_path, file, damage):
    b = copy_of(base)
    MODEL_FILES[file][damage](b / file)
    before = snapshot(b)
    r = run_inprocess(["generate", b, "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert_user_error(r, "generate")
    r = run_inprocess(["export", b, "--out", tmp_path / "exported"], capsys)
    assert_user_error(r, "export")
    assert snapshot(b) == before and not (tmp_path / "exported").exists()


# -- a LoRA run's adapter ------------------------------------------------------------------------------------
ADAPTER_FILES = {"adapter_model.safetensors": BINARY_CORRUPTIONS, "adapter_config.json": CORRUPTIONS,
                 "pocketlm_adapter.json": {"truncate": CORRUPTIONS["truncate"], "garbage": CORRUPTIONS["garbage"]}}
ADAPTER_CASES = [(f, d) for f, damages in ADAPTER_FILES.items() for d in damages
                 if not (f == "pocketlm_adapter.json" and d == "missing")]


@pytest.mark.parametrize("file,damage", ADAPTER_CASES)
def test_damaged_adapter(runs, copy_of, capsys, tmp_path, file, damage):
    run = copy_of(runs("lora", capsys), "lora-copy")
    for adapter in run.glob("checkpoints/step-*/adapter"):
        ADAPTER_FILES[file][damage](adapter / file)
    before = snapshot(run)
    for argv in (["generate", run, "--prompt", "a", "--max-new-tokens", "2"], ["merge", run, "--out", tmp_path / "m"]):
        r = run_inprocess(argv, capsys)
        assert_user_error(r, argv[0])
    assert snapshot(run) == before and not (tmp_path / "m").exists()
