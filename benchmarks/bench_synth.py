"""synth against a batching server: samples/s at --concurrency 1 vs 8 (goal: >= 3x).

Starts `pocketlm serve MODEL --port P` (or uses --teacher URL of a running server), then runs the same
synth job twice into fresh files, once with one request in flight and once with K, and prints both
samples/s and their ratio. The machine must be otherwise idle for the numbers to mean anything.

    python benchmarks/bench_synth.py --model smollm2-135m --samples 48 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [">be me\n>", ">be me, a cat\n>", ">mfw\n>", ">tfw no\n>", ">be me\n>go to the store\n>",
           ">be me, 25\n>", ">wake up\n>", ">be grandpa\n>"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}/health did not answer 200 within {timeout:.0f} s")


def run_synth(url: str, prompts: Path, out: Path, args, concurrency: int) -> dict:
    from pocketlm.synth import Sampling, SynthOptions, synthesize

    opts = SynthOptions(teacher=url, prompts=str(prompts), out=str(out), samples=args.samples, seed=args.seed,
                        sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature),
                        concurrency=concurrency, progress=False)
    return synthesize(opts)["this_run"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="SOURCE for `pocketlm serve`")
    p.add_argument("--teacher", default=None, help="URL of a running server instead of starting one")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    proc = None
    url = args.teacher
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", args.model, "--port", str(port)],
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        wait_healthy(url, proc, args.startup_timeout)
        with tempfile.TemporaryDirectory() as tmp:
            prompts = Path(tmp) / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in PROMPTS))
            run_synth(url, prompts, Path(tmp) / "warmup.jsonl", argparse.Namespace(**{**vars(args), "samples": 2}), 1)
            results = {}
            for k in (1, args.concurrency):
                results[k] = run_synth(url, prompts, Path(tmp) / f"c{k}.jsonl", args, k)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    one, many = results[1], results[args.concurrency]
    ratio = many["samples_per_s"] / one["samples_per_s"]
    print(f"{'concurrency':>11} {'samples':>7} {'seconds':>8} {'samples/s':>9} {'tokens/s':>9}")
    for k, r in results.items():
        print(f"{k:>11} {r['generated']:>7} {r['seconds_generating']:>8.2f} {r['samples_per_s']:>9.3f} "
              f"{r['tokens_per_s']:>9.1f}")
    print(f"ratio {args.concurrency} vs 1: {ratio:.2f}x (goal >= 3x) -> {'PASS' if ratio >= 3 else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "results": results, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
