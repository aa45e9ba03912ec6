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
