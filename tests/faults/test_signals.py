"""Ctrl-C (SIGINT) and SIGKILL at random moments during every command that writes: nothing previously
valid is damaged, nothing half-written is left where a reader looks, and a rerun (or `--resume`) finishes
the job; a resumed training logs the same losses, step for step, as an uninterrupted one."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys

import pytest

from tests.faults.conftest import TRAIN_FLAGS
from tests.faults.harness import (
    REPO,
    SIGNALS,
    Result,
    assert_ok,
    default_ctrl_c,
    env,
    leftovers,
    run_and_signal,
    run_process,
    snapshot,
)


def _check_stopped(result, sig: str, command: str) -> None:
    assert "Traceback" not in result.err, result.err[-3000:]
    if sig == "SIGINT" and result.rc != 0:
        assert result.rc == 130 and result.last_err_line == f"pocketlm {command}: interrupted", result.err[-2000:]
    if sig == "SIGKILL" and result.rc != 0:
        assert result.rc == -signal.SIGKILL


# -- prepare --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", sorted(SIGNALS))
@pytest.mark.parametrize("trial", range(3))
def test_prepare_interrupted_keeps_the_old_data_set(shared_data, data, tmp_path, sig, trial):
    out = tmp_path / "data"
    shutil.copytree(data, out)
    old = snapshot(out)
    source = shared_data / "tinyshakespeare" / "input.txt"  # 1 MB: a second or two of work to interrupt
    argv = ["prepare", source, "--out", out, "--min-val-tokens", "65", "--no-progress"]
    r = run_and_signal(argv, SIGNALS[sig], random.Random(trial).uniform(0.2, 1.8))
    _check_stopped(r, sig, "prepare")
    from pocketlm.data.manifest import load_manifest

    load_manifest(out)  # whatever is there is a whole data set: the old one or the new one
    after = snapshot(out)
    if sig == "SIGINT":
        assert leftovers(tmp_path) == []
    assert_ok(run_process(argv))  # a rerun finishes, and cleans what a SIGKILL left beside DIR
    assert leftovers(tmp_path) == [] and load_manifest(out)["splits"]["train"]["tokens"] > 200_000
    if r.rc != 0:  # stopped before the swap (the old set) or between the swap and exit (the whole new one)
        assert after in (old, snapshot(out))


# -- training -------------------------------------------------------------------------------------------------
def _train_argv(kind: str, base, data, out, steps: int = 8) -> list:
    if kind == "pretrain":
        head = ["pretrain", "--model", "gpt2-tiny"]
    else:
        head = ["finetune", "--base", base, "--method", kind, *(["--rank", "4"] if kind != "full" else [])]
    return [*head, "--data", data, "--max-steps", str(steps), "--out", out, "--save-every", "1",
            "--keep-checkpoints", "2", *TRAIN_FLAGS]


def _losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pretrain", "full", "lora", "qlora"])
def test_training_killed_at_random_moments_resumes_exactly(base, data, tmp_path, kind):
    reference = tmp_path / "reference"
    assert_ok(run_process(_train_argv(kind, base, data, reference)))
    run = tmp_path / "run"
    rng = random.Random(kind)
    for i, sig in enumerate(["SIGKILL", "SIGINT", "SIGKILL"]):
        argv = [*_train_argv(kind, base, data, run), *(["--resume"] if i else [])]
        r = run_and_signal(argv, SIGNALS[sig], rng.uniform(2.0, 9.0))
        _check_stopped(r, sig, kind if kind == "pretrain" else "finetune")
    assert_ok(run_process([*_train_argv(kind, base, data, run), "--resume"]))
    assert _losses(run) == _losses(reference)
    assert leftovers(run) == []


# -- merge, export, eval ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "export", "eval"])
@pytest.mark.parametrize("sig", sorted(SIGNALS))
def test_writers_interrupted_leave_nothing_half_written(base, data, corpus, tmp_path, command, sig):
    run = tmp_path / "lora"
    assert_ok(run_process(_train_argv("lora", base, data, run, steps=2)))
    out = tmp_path / ("out.json" if command == "eval" else "out")
    argv = {"merge": ["merge", run, "--out", out, "--force"], "export": ["export", run, "--out", out, "--overwrite"],
            "eval": ["eval", run, "--text", corpus, "--max-tokens", "2000", "--json", out]}[command]
    for delay in random.Random(command + sig).sample([x / 10 for x in range(10, 80)], 3):
        r = run_and_signal(argv, SIGNALS[sig], delay)
        _check_stopped(r, sig, command)
        if out.exists():  # complete, or not there at all
            if command == "eval":
                json.loads(out.read_text())
            else:
                assert_ok(run_process(["generate", out, "--prompt", "a", "--max-new-tokens", "2"]))
    assert_ok(run_process(argv))
    assert out.exists() and [p for p in leftovers(tmp_path) if "lora" not in p] == []


# -- the edges of a command's life: start-up after the allocator restart, and shutdown ---------------------------
def test_ctrl_c_after_a_command_has_finished_does_not_change_its_exit_status(tmp_path):
    """Python resets Ctrl-C to 'die of the signal' while it shuts down: a Ctrl-C then would turn a finished
    command's status 0 into -2. The command line ignores Ctrl-C once the command has returned."""
    code = ("import os, signal, sys\n"
            "from pocketlm.__main__ import run\n"
            "sys.argv = ['pocketlm', 'models']\n"
            "run()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"  # what a Ctrl-C during shutdown delivers
            "print('finished')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=REPO, timeout=120,
                       preexec_fn=default_ctrl_c)
    assert p.returncode == 0 and p.stdout.rstrip().endswith("finished"), (p.returncode, p.stderr[-2000:])


def test_ctrl_c_held_back_across_the_allocator_restart_is_one_line(tmp_path):
    """The allocator restart blocks SIGINT across exec; one pressed meanwhile stays pending and must arrive as
    `pocketlm CMD: interrupted`, 130 -- not as a traceback from the new interpreter's start-up."""
    from pocketlm.memory import REEXEC_MARK

    code = ("import os, signal, sys\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"  # pending: Ctrl-C pressed while the restart happens
            "os.execve(sys.executable, [sys.executable, '-m', 'pocketlm', 'models'],"
            f" dict(os.environ, {REEXEC_MARK}='1'))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=REPO, timeout=120,
                       preexec_fn=default_ctrl_c)
    result = Result(p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert result.rc == 130 and result.last_err_line == "pocketlm models: interrupted", (p.returncode, p.stderr)


def test_ctrl_c_is_held_back_until_the_command_has_imported_torch(tmp_path):
    """A Ctrl-C landing inside an import aborts (torch's C++ start-up: exit -6) or makes Python exit -2 whatever
    the handler says (code run through exec, as dataclasses does). The command line holds it back until the
    command's modules and torch are imported, and lets it through where it becomes one line."""
    code = ("import signal, sys\n"
            "import pocketlm.cli as cli\n"
            "seen, real = {}, cli.release_ctrl_c\n"
            "def release():\n"
            "    seen['held'] = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
            "    seen['imported'] = 'torch' in sys.modules and 'pocketlm.cli.prepare' in sys.modules\n"
            "    real()\n"
            "    seen['released'] = signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])\n"
            "cli.release_ctrl_c = release\n"
            "from pocketlm.__main__ import run\n"
            f"sys.argv = ['pocketlm', 'prepare', {str(tmp_path / 'missing.txt')!r}, '--out', {str(tmp_path / 'd')!r}]\n"
            "try:\n"
            "    run()\n"
            "except SystemExit as exc:\n"
            "    print(exc.code, sorted(seen.items()))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=dict(env(), POCKETLM_ALLOCATOR="glibc"), preexec_fn=default_ctrl_c)
    assert p.stdout.strip() == "2 [('held', True), ('imported', True), ('released', True)]", (p.stdout, p.stderr)
