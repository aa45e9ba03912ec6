"""The synthetic-data recipe of docs/synth.md at tiny scale: `pocketlm serve` a teacher -> synth (validators,
dedupe, concurrent requests) -> prepare -> students with and without the synthetic data -> loss on real
held-out greentext."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from pocketlm.cli import main

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def served(model_dir: Path):
    """`pocketlm serve MODEL --port P` in a subprocess, until GET /health answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", str(model_dir), "--port", str(port),
                             "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "pocketlm serve did not become healthy"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def split_greentext(shared_data, tmp_path, n_train: int, n_heldout: int):
    """The human-verified greentexts as train.jsonl / heldout.jsonl / heldout.txt (as docs/synth.md does)."""
    db = json.loads((shared_data / "greentext" / "wholesomegreentext_ocr_db.json").read_text())
    texts = [r["verified"].strip() for r in db.values() if r.get("verified")]
    train, heldout = texts[:n_train], texts[n_train : n_train + n_heldout]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout))
    (tmp_path / "heldout.txt").write_text("\n\n".join(heldout) + "\n")


def test_tiny_recipe_runs_end_to_end(shared_data, tmp_path, capsys, one_thread):
    from pocketlm.io import save_model
    from pocketlm.model import GPT
    from pocketlm.tokenizer import load_tokenizer

    split_greentext(shared_data, tmp_path, n_train=40, n_heldout=10)
    torch.manual_seed(0)
    teacher = save_model(GPT.from_name("gpt2-tiny"), load_tokenizer("gpt2"), tmp_path / "teacher")
    (tmp_path / "template.yaml").write_text(
        "template: \"{examples}\\n\\n\"\n"
        "examples:\n  corpus: train.jsonl\n  k: 1\n  max_chars: 300\n")
    synth = tmp_path / "synth.jsonl"
    with served(teacher) as url:
        main(["synth", "--teacher", url, "--prompts", str(tmp_path / "template.yaml"), "--samples", "24",
              "--out", str(synth), "--sample-prefix", ">be me\\n>", "--max-new-tokens", "12", "--validate",
              "greentext", "--dedupe", "minhash", "--dedupe-against", str(tmp_path / "heldout.jsonl"),
              "--concurrency", "4", "--quiet", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["teacher"] == url and report["concurrency"] == 4
    records = [json.loads(line) for line in synth.read_text().splitlines()]
    assert report["records"] == len(records) == 24
    assert 0 < report["kept"] and report["kept"] + sum(report["dropped"].values()) == 24
    assert all(r["kept"] == (not r["reasons"]) for r in records)
    assert all(r["text"].startswith(">be me\n>") for r in records)

    # Real data alone, and real + kept synthetic samples (prepare skips the dropped records).
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((tmp_path / "train.jsonl").read_text() + synth.read_text())
    results = {}
    for name, source in (("real", tmp_path / "train.jsonl"), ("real+synth", mixed)):
        data, run = tmp_path / f"data-{name}", tmp_path / f"run-{name}"
        main(["prepare", str(source), "--text-field", "text", "--out", str(data), "--val-documents", "4", "--min-val-tokens", "129",
              "--no-progress"])
        main(["pretrain", "--model", "gpt2-tiny", "--data", str(data), "--out", str(run), "--max-steps", "3",
              "--batch-tokens", "1024", "--micro-batch", "4", "--context", "128", "--eval-every", "3", "--eval-batches", "2",
              "--warmup-steps", "1", "--lr", "3e-3", "--device", "cpu"])
        main(["eval", str(run), "--text", str(tmp_path / "heldout.txt"), "--json", str(tmp_path / f"{name}.json")])
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    manifest = json.loads((tmp_path / "data-real+synth" / "manifest.json").read_text())
    real_manifest = json.loads((tmp_path / "data-real" / "manifest.json").read_text())
    documents = sum(s["documents"] for s in manifest["splits"].values())
    assert documents == sum(s["documents"] for s in real_manifest["splits"].values()) + report["kept"]
    for result in results.values():
        assert 0 < result["loss"] < 20
