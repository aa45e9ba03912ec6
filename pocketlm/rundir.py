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

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from pocketlm.atomic import AtomicDir, atomic_write_json, atomic_write_text, clean_stale_temporaries
from pocketlm.errors import UserError
from pocketlm.versions import check_format

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
LOCK = ".lock"  # held (fcntl.flock) by the one process training in RUN; the kernel drops it when that dies
TRAINER_STATE_FORMAT = "pocketlm.trainer_state.v1"


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
        try:
            name = pointer.read_text(errors="replace").strip()
        except OSError:
            return None
        if not name.startswith("step-") or Path(name).name != name:  # empty or damaged: names nothing
            return None
        step = self.checkpoints_dir / name
        return step if step.is_dir() else None

    def best_or_latest(self) -> Path:
        """The checkpoint a loader wants: best, else latest, else (pointers lost or damaged) the newest
        complete step folder; a UserError when the run has none."""
        step = self.checkpoint("best") or self.checkpoint("latest") or self.newest_complete_step()
        if step is None:
            if self.step_folders():
                raise UserError(f"run {self.path} has step folders but none is a complete checkpoint (a crash "
                                "while saving?): resume the run with --resume, or restore them")
            raise UserError(f"run {self.path} has no checkpoint yet: train it first "
                            f"(pocketlm pretrain|finetune --out {self.path})")
        return step

    def step_folders(self) -> list[Path]:
        """RUN/checkpoints/step-* folders, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.glob("step-*") if p.is_dir())

    def has_checkpoints(self) -> bool:
        """Any trace of a checkpoint: a step folder or a pointer (even one naming nothing)."""
        return bool(self.step_folders()) or any((self.checkpoints_dir / p).exists() for p in POINTERS)

    def newest_complete_step(self) -> Path | None:
        """The newest step folder whose trainer state reads back (AtomicDir renames only whole folders,
        so this fails only for folders damaged after the fact)."""
        for step in reversed(self.step_folders()):
            try:
                step_state(step)
            except UserError:
                continue
            if (step / TRAINER_STATE_PT).is_file():
                return step
        return None

    def resume_point(self) -> Path | None:
        """The checkpoint a resume continues from: `latest`, or, when that pointer is missing, empty,
        damaged or names a folder that is gone, the newest complete step folder (never step 0 while
        checkpoints exist: that would overwrite them)."""
        return self.checkpoint("latest") or self.newest_complete_step()

    # -- a run trains in one process at a time ------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold RUN/.lock while training: a second training of the same RUN is refused in one line. The
        lock is the kernel's (fcntl.flock), so a killed process never leaves a stale one."""
        if not self.is_main:
            yield
            return
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise UserError(f"another pocketlm process (pid {holder}) is training in {self.path}: wait for it "
                                "to finish (or stop it), or choose another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def clean_temporaries(self) -> list[Path]:
        """Remove what killed processes left: `.step-*.tmp` folders, `.latest.*.tmp` files and the like
        (a `.NAME.old` whose NAME is missing is put back instead)."""
        if not self.is_main:
            return []
        return clean_stale_temporaries(self.checkpoints_dir) + clean_stale_temporaries(self.path)

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
            record = {"format": TRAINER_STATE_FORMAT, **trainer_state}
            (tmp / TRAINER_STATE_JSON).write_text(json.dumps(record, indent=2) + "\n")
        atomic_write_text(self.checkpoints_dir / "latest", final.name)
        if is_best:
            atomic_write_text(self.checkpoints_dir / "best", final.name)
        self.prune(keep)
        return final

    @staticmethod
    def read_trainer_state(step_dir: Path) -> tuple[dict, dict]:
        """(trainer_state.json, trainer_state.pt) of a step folder; the .pt with weights_only=True."""
        import pickle

        import torch

        state = step_state(step_dir)
        path = step_dir / TRAINER_STATE_PT
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise UserError(f"checkpoint {step_dir} is damaged: {TRAINER_STATE_PT} does not load "
                            f"({str(exc).splitlines()[0][:100]}): {_DAMAGED_HINT}") from None
        if not isinstance(saved, dict):
            raise UserError(f"checkpoint {step_dir} is damaged: {TRAINER_STATE_PT} holds no state: {_DAMAGED_HINT}")
        return state, saved

    def prune(self, keep: int) -> None:
        """Keep the `keep` most recent step folders, and whatever `latest` and `best` name."""
        ckpts = self.checkpoints_dir
        protected = {step.name for step in (self.checkpoint(p) for p in POINTERS) if step is not None}
        steps = sorted(p.name for p in ckpts.glob("step-*") if p.is_dir())
        for name in steps[: max(0, len(steps) - keep)]:
            if name not in protected:
                # Renamed first: a kill during the removal leaves a `.tmp` the next start removes, never a
                # half-deleted step folder that looks like a checkpoint.
                doomed = ckpts / f".{name}.pruned.tmp"
                os.replace(ckpts / name, doomed)
                shutil.rmtree(doomed, ignore_errors=True)


def damaged(step_dir: Path, what: str) -> UserError:
    return UserError(f"checkpoint {step_dir} is damaged: {what}: {_DAMAGED_HINT}")


_DAMAGED_HINT = ("delete that step folder to resume from the one before it (`latest` falls back to the newest "
                 "complete checkpoint), or start a new run")


def step_state(step_dir: str | Path) -> dict:
    """A checkpoint's trainer_state.json (step, data position, best metric, patience); no torch needed.
    A damaged, foreign or newer file is a one-line UserError naming the step folder."""
    step_dir = Path(step_dir)
    path = step_dir / TRAINER_STATE_JSON
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"checkpoint {step_dir} is damaged: {TRAINER_STATE_JSON} is not complete JSON "
                        f"({str(exc).splitlines()[0][:80]}): {_DAMAGED_HINT}") from None
    except OSError as exc:
        raise UserError(f"checkpoint {step_dir} is damaged: cannot read {TRAINER_STATE_JSON} "
                        f"({exc.strerror or exc}): {_DAMAGED_HINT}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"checkpoint {step_dir} is damaged: {TRAINER_STATE_JSON} has no step: {_DAMAGED_HINT}")
    check_format(state.pop("format", TRAINER_STATE_FORMAT), TRAINER_STATE_FORMAT, path, "a pocketlm trainer state",
                 "resume it with the pocketlm that wrote it")
    return state


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
