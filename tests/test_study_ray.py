"""The Ray executor against a local Ray instance (two workers, a tiny model): the same results as the
local executor, cells as run directories, and the same resume semantics."""

from __future__ import annotations

import pytest

from pocketlm.study import run_study
from pocketlm.study.results import read_results

ray = pytest.importorskip("ray", reason="the Ray executor is an optional extra: pip install 'pocketlm[ray]'")

STUDY = """\
study: tiny-ray
data:
  source: {corpus}
base:
  max_steps: 4
  batch_tokens: 1024
  micro_batch: 8
  context: 64
  eval_every: 2
  eval_batches: 2
  log_every: 1
  warmup_steps: 1
  precision: fp32
  lr: 1.0e-3
  arch: gpt2-tiny
axes:
  seed: [1, 2]
  stage:
    - {{name: scratch, method: pretrain}}
measures:
  - val_loss: {{max_tokens: 256}}
"""
STABLE = ("cell", "status", "knobs", "seed", "method", "trainable_params", "steps", "best_val_loss", "val_loss",
          "bits_per_byte", "size_bytes")


@pytest.mark.slow
def test_ray_executor_matches_the_local_executor(tmp_path, tiny_text):
    study = tmp_path / "s.yaml"
    study.write_text(STUDY.format(corpus=tiny_text))
    local = run_study(str(study), tmp_path / "local", threads=1, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        distributed = run_study(str(study), tmp_path / "ray", executor="ray", cpus_per_cell=1, threads=1,
                                progress=False)
        again = run_study(str(study), tmp_path / "ray", executor="ray", threads=1, progress=False)
    finally:
        ray.shutdown()
    assert [r["status"] for r in distributed] == ["ok", "ok"]
    assert [{k: r.get(k) for k in STABLE} for r in distributed] == [{k: r.get(k) for k in STABLE} for r in local]
    for r in distributed:
        assert (tmp_path / "ray" / r["cell"] / "summary.json").exists()
    assert again == distributed == read_results(tmp_path / "ray")  # finished cells are not run again
