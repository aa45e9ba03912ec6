"""Killing `pocketlm synth` at random moments loses nothing: a rerun ends with exactly N whole records."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _lines(path: Path) -> list[str]:
    return path.read_text().split("\n") if path.exists() else []


def test_killed_five_times_then_rerun_gives_exactly_n_records(tmp_path):
    from pocketlm.io import save_model
    from pocketlm.model import GPT
    from pocketlm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    teacher = save_model(GPT.from_name("gpt2-tiny"), load_tokenizer("gpt2"), tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n>be me\nROMEO:\n")
    n = 40

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "pocketlm", "synth", "--teacher", str(teacher), "--prompts", str(prompts),
                "--samples", str(n), "--out", str(out), "--max-new-tokens", "12", "--dedupe", "exact",
                "--device", "cpu", "--quiet"]

    out = tmp_path / "out.jsonl"
    rng = random.Random(16)
    kills = 0
    while kills < 5:
        before = len([line for line in _lines(out) if line.strip()])
        proc = subprocess.Popen(command(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = before + rng.randint(0, 6)  # 0: kill it while it starts up
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len([line for line in _lines(out) if line.strip()]) >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))  # anywhere: mid-request, mid-write, between records
        if proc.poll() is not None:
            break  # finished before the kill (should not happen with these sizes)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
        # Every complete line is a whole record, whatever the moment of the kill.
        for line in _lines(out)[:-1]:
            json.loads(line)
    assert kills == 5, "synth finished before it could be killed five times"
    assert len([line for line in _lines(out) if line.strip()]) < n

    done = subprocess.run(command(out), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == n and len({r["id"] for r in records}) == n
    assert sorted(r["index"] for r in records) == list(range(n))

    # The same command uninterrupted names the same samples with the same texts.
    reference = tmp_path / "reference.jsonl"
    done = subprocess.run(command(reference), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = {r["id"]: r["text"] for r in map(json.loads, reference.read_text().splitlines())}
    assert {r["id"]: r["text"] for r in records} == expected
