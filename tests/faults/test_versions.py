"""Every user-facing file format names its version; a reader meeting a newer one refuses in one line."""

from __future__ import annotations

import json

import pytest

from pocketlm.errors import UserError
from pocketlm.versions import check_format, parse_format
from tests.faults.harness import assert_user_error, run_inprocess


def _bump(path, fmt):
    data = json.loads(path.read_text())
    data["format"] = fmt
    path.write_text(json.dumps(data))


def test_parse_and_check():
    assert parse_format("pocketlm.tokens.v1") == ("pocketlm.tokens", 1)
    assert parse_format("tokens") is None and parse_format(3) is None
    check_format("pocketlm.tokens.v1", "pocketlm.tokens.v1", "m.json", "a data set", "fix")
    with pytest.raises(UserError, match="newer pocketlm"):
        check_format("pocketlm.tokens.v2", "pocketlm.tokens.v1", "m.json", "a data set", "fix")
    with pytest.raises(UserError, match="is not a data set"):
        check_format("pocketlm.model.v1", "pocketlm.tokens.v1", "m.json", "a data set", "fix")
    with pytest.raises(UserError, match="unknown format version"):
        check_format("pocketlm.tokens.v0", "pocketlm.tokens.v1", "m.json", "a data set", "fix")


def test_newer_model_folder(base, copy_of, capsys):
    b = copy_of(base)
    _bump(b / "pocketlm.json", "pocketlm.model.v7")
    r = run_inprocess(["generate", b, "--prompt", "a", "--max-new-tokens", "2"], capsys)
    assert_user_error(r, "generate", "newer pocketlm")


def test_newer_adapter(runs, copy_of, capsys, tmp_path):
    run = copy_of(runs("lora", capsys), "lora-copy")
    for sidecar in run.glob("checkpoints/step-*/adapter/pocketlm_adapter.json"):
        _bump(sidecar, "pocketlm.adapter.v2")
    r = run_inprocess(["merge", run, "--out", tmp_path / "merged"], capsys)
    assert_user_error(r, "merge", "newer pocketlm")
    assert not (tmp_path / "merged").exists()


def test_newer_data_set(data, copy_of, capsys, tmp_path):
    d = copy_of(data)
    _bump(d / "manifest.json", "pocketlm.tokens.v2")
    r = run_inprocess(["pretrain", "--model", "gpt2-tiny", "--data", d, "--out", tmp_path / "run"], capsys)
    assert_user_error(r, "pretrain", "newer pocketlm")


def test_newer_classifier_metadata():
    from pocketlm.classify.io import ClassifierInfo

    with pytest.raises(UserError, match="newer pocketlm"):
        ClassifierInfo.from_dict({"format": "pocketlm.classifier.v3"})
