"""SIGKILL soak: kill a LoRA fine-tune at random moments, `--resume` it each time, and check the promise.

    python scripts/soak_kill.py --kills 20 --steps 40 --work /tmp/soak          # tiny model built here
    python scripts/soak_kill.py --base smollm2-135m --data data/shakespeare-smol --steps 30 --kills 20

Each kill lands at a random moment: kill i waits until the run has logged a randomly chosen step (the
chosen steps spread over the whole fine-tune; some are 0, i.e. during start-up), then a random part of a
step more, so kills hit start-up, forward/backward, evaluation, checkpoint writes and metrics appends.
After every kill every checkpoint on disk is loaded (weights, trainer_state.json, trainer_state.pt with
weights_only=True) and `latest` must name one that loads. Finally the run is resumed to the end and its
metrics are compared with an uninterrupted run of the same recipe, row for row.

Prints a report (kills, resumes, equal losses, checkpoints that failed to load) and writes it as JSON
(--report). Exit status 0 only when every resume worked, the losses are equal and no checkpoint was corrupt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--device", "cpu", "--precision", "fp32", "--context", "32", "--micro-batch", "2", "--batch-tokens", "128",
         "--eval-batches", "2", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "5", "--save-every", "1",
         "--keep-checkpoints", "3", "--lr", "3e-3"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["POCKETLM_ALLOCATOR"] = "glibc"  # no re-exec: the pid we kill is the trainer
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _command(args: argparse.Namespace, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "pocketlm", "finetune", "--base", str(args.base), "--data", str(args.data),
            "--method", args.method, "--rank", "4", "--max-steps", str(args.steps), "--out", str(out), *FLAGS,
            *(["--resume"] if resume else [])]


def build_tiny(work: Path, corpus: Path) -> tuple[Path, Path]:
    """A 2-layer llama base with a 512-token BPE trained on the corpus, and the corpus prepared with it."""
    import torch
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from pocketlm.data.prepare import prepare
    from pocketlm.io import save_model
    from pocketlm.model import GPT, ModelConfig
    from pocketlm.tokenizer import Tokenizer

    text = corpus.read_text(encoding="utf-8")[:200_000]
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend, "small", "<|endoftext|>")
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=64, intermediate_size=128, bias=False, tokenizer="small")
    base = save_model(GPT(cfg), tok, work / "base")
    (work / "corpus.txt").write_text(text, encoding="utf-8")
    prepare(work / "corpus.txt", work / "data", tokenizer=str(base), min_val_tokens=65, progress=False,
            log=lambda _m: None)
    return base, work / "data"


def logged_step(run: Path) -> int:
    """The last step in RUN/metrics.jsonl (0 if none), tolerating a line being appended right now."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def check_checkpoints(run: Path) -> list[str]:
    """Every step folder must load; `latest`, if present, must name one. Returns the failures."""
    import torch

    from pocketlm.io import load_model

    failures = []
    ckpts = run / "checkpoints"
    if not ckpts.is_dir():
        return failures
    for step in sorted(p for p in ckpts.glob("step-*") if p.is_dir()):
        try:
            json.loads((step / "trainer_state.json").read_text())
            torch.load(step / "trainer_state.pt", map_location="cpu", weights_only=True)
            load_model(step)
        except Exception as exc:  # noqa: BLE001 - any failure to load is what we count
            failures.append(f"{step.name}: {type(exc).__name__}: {str(exc)[:160]}")
    latest = ckpts / "latest"
    if latest.exists() and not (ckpts / latest.read_text().strip()).is_dir():
        failures.append(f"latest names {latest.read_text().strip()!r}, which does not exist")
    return failures


def metrics(run: Path) -> list[dict]:
    keep = ("step", "train_loss", "val_loss")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def kill_once(args: argparse.Namespace, run: Path, target: int, fraction: float, step_s: float, resume: bool,
              log) -> dict:
    """Start (or resume) the run, wait for step `target`, wait `fraction` of a step more, SIGKILL."""
    proc = subprocess.Popen(_command(args, run, resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=REPO)
    deadline = time.monotonic() + args.timeout
    while proc.poll() is None and logged_step(run) < target and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(fraction * step_s)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    event = {"target_step": target, "killed": killed, "rc": proc.returncode, "logged_step": logged_step(run),
             "resume": resume}
    if not killed and proc.returncode != 0:
        event["error"] = err.strip().splitlines()[-1] if err.strip() else ""
    log(event)
    return event


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps of the run")
    p.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--base", type=Path, default=None, help="base model (default: a tiny one built here)")
    p.add_argument("--data", type=Path, default=None, help="prepared data (default: built here with the base)")
    p.add_argument("--corpus", type=Path, default=None, help="text for the tiny base (default: tiny Shakespeare)")
    p.add_argument("--work", type=Path, default=Path("soak-work"), help="working folder (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds one attempt may take")
    p.add_argument("--report", type=Path, default=None, help="write the report as JSON here")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    if args.base is None:
        shared = Path(os.environ.get("POCKETLM_SHARED_DATA", REPO.parent / "shared" / "data"))
        corpus = args.corpus or shared / "tinyshakespeare" / "input.txt"
        args.base, built_data = build_tiny(args.work, corpus)
        args.data = args.data or built_data
    if args.data is None:
        p.error("--data is needed with --base")

    def log(event: dict) -> None:
        print(json.dumps(event), flush=True)

    # The uninterrupted reference, timed to size the random part of a step.
    start = time.monotonic()
    ref = subprocess.run(_command(args, args.work / "reference", False), capture_output=True, text=True,
                         env=_env(), cwd=REPO)
    if ref.returncode != 0:
        print(ref.stderr[-3000:], file=sys.stderr)
        return 1
    step_s = (time.monotonic() - start) / args.steps  # an upper bound: includes start-up

    rng = random.Random(args.seed)
    targets = sorted(rng.randrange(0, args.steps) for _ in range(args.kills))
    run = args.work / "run"
    kills = resumes = attempts = 0
    failed_resumes, corrupt = [], []
    for target in targets:
        event = kill_once(args, run, target, rng.random(), step_s, resume=attempts > 0, log=log)
        attempts += 1
        resumes += event["resume"]
        kills += event["killed"]
        if not event["killed"] and event["rc"] != 0:
            failed_resumes.append(event)
        bad = check_checkpoints(run)
        corrupt.extend(f"after kill {kills}: {b}" for b in bad)
    final = subprocess.run(_command(args, run, True), capture_output=True, text=True, env=_env(), cwd=REPO)
    resumes += 1
    if final.returncode != 0:
        failed_resumes.append({"final": True, "error": final.stderr.strip().splitlines()[-1:]})
    got, want = (metrics(run) if (run / "metrics.jsonl").exists() else []), metrics(args.work / "reference")
    mismatch = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    equal = got == want
    report = {
        "kills": kills, "attempts": attempts, "resumes": resumes, "failed_resumes": failed_resumes,
        "equal_losses": equal, "rows": len(got), "reference_rows": len(want),
        "first_mismatch": None if equal else {"index": mismatch, "got": got[mismatch] if mismatch is not None
                                              and mismatch < len(got) else None,
                                              "want": want[mismatch] if mismatch is not None else None},
        "corrupt_checkpoints": corrupt, "method": args.method, "steps": args.steps,
    }
    print(f"soak: {kills} kills in {attempts} attempts, {resumes} resumes ({len(failed_resumes)} failed); "
          f"losses {'equal' if equal else 'DIFFER'} over {len(got)} rows; "
          f"{len(corrupt)} checkpoint(s) failed to load")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if equal and not corrupt and not failed_resumes else 1


if __name__ == "__main__":
    sys.exit(main())
