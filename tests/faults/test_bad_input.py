"""Bad input to every command: one line, exit status 2, nothing written, before any progress bar."""

from __future__ import annotations

import pytest

from tests.faults.conftest import TRAIN_FLAGS
from tests.faults.harness import assert_ok, assert_user_error, run_inprocess, snapshot


def test_binary_file_is_not_a_corpus(tmp_path, capsys):
    fake = tmp_path / "weights.txt"
    fake.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    r = run_inprocess(["prepare", fake, "--out", tmp_path / "d"], capsys)
    assert_user_error(r, "prepare", "binary file")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("regex", [r"\n*", "^", r"\b", "(x)?"])
def test_a_separator_that_matches_nothing_is_refused(corpus, tmp_path, capsys, regex):
    r = run_inprocess(["prepare", corpus, "--out", tmp_path / "d", "--delimiter-regex", regex], capsys)
    assert_user_error(r, "prepare", "matches the empty string")


def test_a_lookahead_separator_is_fine(tmp_path, capsys):
    src = tmp_path / "book.txt"
    src.write_text("".join(f"CHAPTER {i}\n" + "Some words here and there. " * 40 + "\n" for i in range(6)))
    r = run_inprocess(["prepare", src, "--out", tmp_path / "d", "--delimiter-regex", "(?=CHAPTER)",
                       "--val-documents", "1", "--min-val-tokens", "10", "--no-progress"], capsys)
    assert_ok(r)
    assert "6 documents" in r.out


@pytest.mark.parametrize("case", ["out_is_file", "out_holds_other_files", "out_under_a_file"])
def test_prepare_output_mistakes(corpus, tmp_path, capsys, case):
    target = tmp_path / "target"
    if case == "out_is_file":
        target.write_text("precious")
    elif case == "out_holds_other_files":
        target.mkdir()
        (target / "notes.txt").write_text("precious")
    else:
        (tmp_path / "file").write_text("precious")
        target = tmp_path / "file" / "d"
    before = snapshot(tmp_path)
    r = run_inprocess(["prepare", corpus, "--out", target, "--min-val-tokens", "65"], capsys)
    assert_user_error(r, "prepare")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_json_naming_a_folder_is_refused_before_work(runs, tmp_path, capsys, corpus, command):
    run = runs("pretrain", capsys)
    folder = tmp_path / "folder"
    folder.mkdir()
    argv = ([command, run, "--prompt", "hi", "--max-new-tokens", "2"] if command == "generate"
            else [command, run, "--text", corpus, "--max-tokens", "64"])
    r = run_inprocess([*argv, "--json", folder], capsys)
    assert_user_error(r, command, "is a folder")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("flags,message", [
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--grad-clip", "nan"], "grad-clip must be a finite number"),
    (["--context", "4096"], "longer than the model's context"),
    (["--batch-tokens", "100"], "not divisible"),
    (["--precision", "fp8"], "unknown precision"),
])
def test_bad_training_values_are_refused_before_the_progress_bar(data, tmp_path, capsys, flags, message):
    r = run_inprocess(["pretrain", "--model", "gpt2-tiny", "--data", data, "--max-steps", "2",
                       "--out", tmp_path / "run", *TRAIN_FLAGS, *flags], capsys)
    assert_user_error(r, "pretrain", message)
    assert "it/s" not in r.err and "%|" not in r.err  # no progress bar was started
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("yaml_text,message", [
    ("max_steps: ten\n", "max_steps must be int"),
    ("lr: [1, 2]\n", "lr must be float"),
    ("compile: 3\n", "compile must be bool"),
    ("context_schedule: 5\n", "context_schedule must be list"),
    ("max_steps: true\n", "max_steps must be int"),
])
def test_recipe_values_of_the_wrong_type(data, tmp_path, capsys, yaml_text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml_text)
    r = run_inprocess(["pretrain", "--config", recipe, "--data", data, "--out", tmp_path / "run"], capsys)
    assert_user_error(r, "pretrain", message)


def test_recipe_exponent_without_a_dot_is_a_number(tmp_path):
    from pocketlm.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\n")  # YAML 1.1 reads this as a string
    assert load_recipe(str(recipe)).lr == 1e-3


def test_data_without_validation_split_is_refused_before_training(corpus, tmp_path, capsys, base):
    r = run_inprocess(["prepare", corpus, "--out", tmp_path / "d0", "--val-fraction", "0",
                       "--tokenizer", base, "--no-progress"], capsys)
    assert_ok(r)
    r = run_inprocess(["pretrain", "--model", "gpt2-tiny", "--data", tmp_path / "d0", "--max-steps", "2",
                       "--out", tmp_path / "run", *TRAIN_FLAGS], capsys)
    assert_user_error(r, "pretrain", "no validation split")
    assert "%|" not in r.err


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_out_naming_a_file(base, data, tmp_path, capsys, command):
    target = tmp_path / "file"
    target.write_text("precious")
    argv = (["pretrain", "--model", "gpt2-tiny"] if command == "pretrain" else ["finetune", "--base", base])
    r = run_inprocess([*argv, "--data", data, "--max-steps", "2", "--out", target, *TRAIN_FLAGS], capsys)
    assert_user_error(r, command, "is a file")
    assert target.read_text() == "precious"


def test_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    r = run_inprocess(["generate", "runs/nope", "--prompt", "hi"], capsys)
    assert_user_error(r, "generate", "does not exist")
    assert "huggingface-cli download" not in r.err


@pytest.mark.parametrize("command", ["export", "merge"])
def test_export_and_merge_out_under_a_file(runs, tmp_path, capsys, command):
    source = runs("lora", capsys)
    (tmp_path / "file").write_text("precious")
    r = run_inprocess([command, source, "--out", tmp_path / "file" / "model"], capsys)
    assert_user_error(r, command, "is a file")


def test_an_unknown_flag_names_the_command(capsys):
    from pocketlm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--beta1", "0.8"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "pocketlm pretrain: error: unrecognized arguments: --beta1 0.8"


def test_more_values_refused(corpus, data, tmp_path, capsys):
    r = run_inprocess(["prepare", corpus, "--out", tmp_path / "d", "--min-val-tokens", "-5"], capsys)
    assert_user_error(r, "prepare", "min-val-tokens")
    r = run_inprocess(["pretrain", "--model", "gpt2-tiny", "--data", data, "--out", tmp_path / "r",
                       "--keep-checkpoints", "0", *TRAIN_FLAGS], capsys)
    assert_user_error(r, "pretrain", "keep-checkpoints must be positive")
