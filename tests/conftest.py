"""Shared test fixtures. Benchmark data sets are read from ../shared/data, never copied here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    candidates = [os.environ.get("POCKETLM_SHARED_DATA"), REPO.parent / "shared" / "data", REPO / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    raise RuntimeError("../shared/data not found beside the repository: set POCKETLM_SHARED_DATA")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _shared_data()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare numbers across runs: a fixed thread count keeps CPU reductions reproducible.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def one_thread():
    """One torch thread: tiny models on a shared 2-core machine, where two OpenMP threads spin-wait on
    each other, run about 10x faster on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory, shared_data) -> Path:
    """The first 60,000 characters of tiny Shakespeare: enough for a few hundred windows."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text((shared_data / "tinyshakespeare" / "input.txt").read_text()[:60_000])
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_text) -> Path:
    """tiny_text prepared with GPT-2's tokenizer (90/10 split by characters)."""
    from pocketlm.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(tiny_text, out, tokenizer="gpt2", val_fraction=0.1, min_val_tokens=65, progress=False,
            log=lambda _msg: None)
    return out
