"""Every command of the CLI (COMMAND_MODULES, which the README names) meets a bad input and an unwritable
output path: one line `pocketlm COMMAND: error: ...`, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import pytest

from pocketlm.cli import COMMAND_MODULES
from tests.faults.harness import assert_user_error, run_inprocess, snapshot


def _cases(tmp, base, data, corpus):
    """command -> argv with a mistake in it; every entry must fail as a user error."""
    folder = tmp / "a-folder"
    folder.mkdir(exist_ok=True)
    afile = tmp / "a-file"
    afile.write_text("precious")
    prompts = tmp / "prompts.txt"
    prompts.write_text("Write a line.\n")
    return {
        "demo": [["demo", "--out", afile / "demo", "--scratch-steps", "1", "--skip-finetune"]],
        "models": [["models", "--no-such-flag"]],
        "prepare": [["prepare", corpus, "--out", afile], ["prepare", tmp / "missing.txt", "--out", tmp / "d"]],
        "pretrain": [["pretrain", "--model", "no-such-size", "--data", data, "--out", tmp / "r"],
                     ["pretrain", "--model", "gpt2-tiny", "--data", data, "--out", afile]],
        "finetune": [["finetune", "--base", base, "--data", data, "--out", afile, "--max-steps", "1"],
                     ["finetune", "--base", base, "--data", tmp / "missing", "--out", tmp / "r"]],
        "generate": [["generate", base, "--prompt", "a", "--json", folder],
                     ["generate", base, "--prompt", "a", "--top-p", "2"]],
        "eval": [["eval", base, "--text", corpus, "--json", folder], ["eval", base, "--text", tmp / "missing.txt"]],
        "export": [["export", base, "--out", afile / "x"], ["export", tmp / "missing", "--out", tmp / "x"]],
        "merge": [["merge", base, "--out", tmp / "m"], ["merge", tmp / "missing", "--out", tmp / "m"]],
        "serve": [["serve", tmp / "missing"], ["serve", base, "--port", "-5"]],
        "synth": [["synth", "--teacher", base, "--prompts", tmp / "missing.yaml", "--samples", "1", "--out",
                   tmp / "s.jsonl"],
                  ["synth", "--teacher", base, "--prompts", prompts, "--samples", "1", "--out", folder]],
        "quantize": [["quantize", base, "--format", "int8", "--out", afile / "q"],
                     ["quantize", tmp / "missing", "--format", "int8", "--out", tmp / "q"]],
        "study": [["study", "run", tmp / "missing.yaml", "--out", tmp / "st"]],
    }


def test_every_command_has_cases(tmp_path, base, data, corpus):
    assert sorted(_cases(tmp_path, base, data, corpus)) == sorted(COMMAND_MODULES)


@pytest.mark.parametrize("command", COMMAND_MODULES)
def test_every_command_refuses_mistakes_in_one_line(tmp_path, base, data, corpus, capsys, command):
    for argv in _cases(tmp_path, base, data, corpus)[command]:
        before = snapshot(tmp_path)
        if command == "models":  # argparse's own refusal: exit 2, usage, one error line
            with pytest.raises(SystemExit) as exc:
                from pocketlm.cli import main

                main([str(a) for a in argv])
            assert exc.value.code == 2
            continue
        r = run_inprocess(argv, capsys)
        assert_user_error(r, command)
        assert snapshot(tmp_path) == before, argv
