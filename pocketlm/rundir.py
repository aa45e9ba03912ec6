"""The run directory (`pocketlm pretrain|finetune --out RUN`): every RUN/ path, its readers and writers.

Nothing else in pocketlm builds these paths; code that needs a run's config, metrics, checkpoints or
summary asks a `RunDir`. Layout (ARCHITECTURE.md documents the formats):

    RUN/config.yaml                     the resolved recipe (TrainConfig.to_dict())
    RUN/metrics.jsonl                   one JSON object per logged step
    RUN/samples.jsonl                   samples written during training
    RUN/summary.json                    final figures
    RUN/lr_search.json, RUN/lr_search/lr-X/   a learning-rate search and its short runs
    RUN/tensorboard/                    optional TensorBoard event files
    RUN/splits/{train,val,test}.jsonl   a classifier's seeded split of a file without --val-data
    RUN/checkpoints/step-NNNNNNN/       weights (a model folder or adapter/) + trainer_state.{json,pt}
    RUN/checkpoints/latest, best        text files naming a step folder, replaced atomically

Every write that a crash could corrupt goes through pocketlm.atomic (a temporary name, then a rename);
metrics.jsonl and samples.jsonl are appended line by line, and a resume drops rows past its checkpoint.
No torch import at module level: the CLI and the demo read runs without it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from pocketlm.atomic import AtomicDir, atomic_write_json, atomic_write_text
from pocketlm.errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LR_SEARCH = "lr_search"
LR_SEARCH_RECORD = "lr_search.json"
SPLITS = "splits"
TRAINER_STATE_JSON = "trainer_state.json"  # step, data position, best metric, patience
TRAINER_STATE_PT = "trainer_state.pt"  # optimizer and RNG state (torch.load with weights_only=True)
POINTERS = ("latest", "best")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def is_run_dir(path: str | Path) -> bool:
    """A run directory (it has RUN/checkpoints/), as opposed to a model or adapter folder."""
    return (Path(path) / CHECKPOINTS).is_dir()


class RunDir:
    """One run directory. `is_main` False (a non-zero torchrun rank) makes every writer a no-op."""

    def __init__(self, path: str | Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths --------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def splits_dir(self) -> Path:
        return self.path / SPLITS

    @property
    def lr_search_record(self) -> Path:
        return self.path / LR_SEARCH_RECORD

    def lr_search_run(self, lr: float) -> RunDir:
        """The short run of a learning-rate search at `lr`."""
        return RunDir(self.path / LR_SEARCH / f"lr-{lr:g}", self.is_main)

    def step_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_name(step)

    # -- config -------------------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        """RUN/config.yaml as a dict ({} when the run has none)."""
        if not self.config_path.is_file():
            return {}
        try:
            loaded = yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{self.config_path} is not valid YAML ({str(exc).splitlines()[0]}): "
                            "restore it or start a new run") from exc
        return loaded if isinstance(loaded, dict) else {}

    # -- metrics and samples ------------------------------------------------------------------------
    def log(self, row: dict) -> None:
        self._append(self.metrics_path, row)

    def read_metrics(self) -> list[dict]:
        return _read_jsonl(self.metrics_path)

    def truncate_metrics(self, last_step: int) -> None:
        """Drop rows logged after the checkpoint a resume starts from: they will be logged again."""
        if self.is_main and self.metrics_path.exists():
            rows = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def append_sample(self, row: dict) -> None:
        self._append(self.samples_path, row)

    def read_samples(self) -> list[dict]:
        return _read_jsonl(self.samples_path)

    def _append(self, path: Path, row: dict) -> None:
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    # -- summary and learning-rate search -----------------------------------------------------------
    def write_summary(self, summary: dict) -> None:
        if self.is_main:
            atomic_write_json(self.summary_path, summary)

    def read_summary(self) -> dict | None:
        return _read_json(self.summary_path)

    def write_lr_search(self, record: dict) -> None:
        if self.is_main:
            atomic_write_json(self.lr_search_record, record)

    def read_lr_search(self) -> dict | None:
        return _read_json(self.lr_search_record)

    def drop_checkpoints(self) -> None:
        """Remove every checkpoint (a finished learning-rate search run keeps only its numbers)."""
        if self.is_main:
            shutil.rmtree(self.checkpoints_dir, ignore_errors=True)

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint(self, which: str = "best") -> Path | None:
        """The step folder the `best` or `latest` pointer names, or None if there is none."""
        pointer = self.checkpoints_dir / which
        if not pointer.is_file():
            return None
        step = self.checkpoints_dir / pointer.read_text().strip()
        return step if step.is_dir() else None

    def best_or_latest(self) -> Path:
        """The checkpoint a loader wants: best, else latest; a UserError when the run has none."""
        step = self.checkpoint("best") or self.checkpoint("latest")
        if step is None:
            raise UserError(f"run {self.path} has no checkpoint yet: train it first "
                            f"(pocketlm pretrain|finetune --out {self.path})")
        return step

    def save_checkpoint(self, step: int, write_weights: Callable[[Path], None], trainer_state: dict,
                        torch_state: dict, *, is_best: bool, keep: int) -> Path | None:
        """Write RUN/checkpoints/step-N atomically, then move `latest` (and `best`) to it, then prune.

        `write_weights(folder)` writes the model files (a model folder, or adapter/) into the temporary
        folder; `torch_state` (optimizer, RNG) goes to trainer_state.pt, `trainer_state` to the JSON.
        """
        if not self.is_main:
            return None
        import torch  # only a saving trainer needs it

        final = self.step_dir(step)
        with AtomicDir(final) as tmp:
            write_weights(tmp)
            torch.save(torch_state, tmp / TRAINER_STATE_PT)
            (tmp / TRAINER_STATE_JSON).write_text(json.dumps(trainer_state, indent=2) + "\n")
        atomic_write_text(self.checkpoints_dir / "latest", final.name)
        if is_best:
            atomic_write_text(self.checkpoints_dir / "best", final.name)
        self.prune(keep)
        return final

    @staticmethod
    def read_trainer_state(step_dir: Path) -> tuple[dict, dict]:
        """(trainer_state.json, trainer_state.pt) of a step folder; the .pt with weights_only=True."""
        import torch

        state = step_state(step_dir)
        saved = torch.load(step_dir / TRAINER_STATE_PT, map_location="cpu", weights_only=True)
        return state, saved

    def prune(self, keep: int) -> None:
        """Keep the `keep` most recent step folders, and whatever `latest` and `best` name."""
        ckpts = self.checkpoints_dir
        protected = {(ckpts / p).read_text().strip() for p in POINTERS if (ckpts / p).is_file()}
        steps = sorted(p.name for p in ckpts.glob("step-*") if p.is_dir())
        for name in steps[: max(0, len(steps) - keep)]:
            if name not in protected:
                shutil.rmtree(ckpts / name, ignore_errors=True)


def step_state(step_dir: str | Path) -> dict:
    """A checkpoint's trainer_state.json (step, data position, best metric, patience); no torch needed."""
    return json.loads((Path(step_dir) / TRAINER_STATE_JSON).read_text())


def run_of_step(step_dir: str | Path) -> RunDir | None:
    """The run a checkpoint step folder (or the temporary folder a step is written into) belongs to."""
    step_dir = Path(step_dir)
    if step_dir.parent.name == CHECKPOINTS:
        return RunDir(step_dir.parent.parent)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory -> its best (else latest) step folder; any other path unchanged."""
    path = Path(path)
    return RunDir(path).best_or_latest() if is_run_dir(path) else path


def _read_jsonl(path: Path) -> list[dict]:
    """Every complete row; a line a crash cut short (appends are not atomic) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
