"""One cell of a study: prepare its data (shared between cells), train it (resuming exactly where an
interrupted run stopped), apply post-training steps, measure, and write DIR/CELL/cell.json.

A cell's run directory is an ordinary run directory (`pocketlm generate DIR/CELL`, `pocketlm eval ...`
work on it). This module runs inside the executor's worker process, so that a cell's peak memory is its
own and a cell that crashes its process is recorded as failed while the study goes on.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from pocketlm.atomic import atomic_write_json
from pocketlm.errors import UserError
from pocketlm.study import knobs as K
from pocketlm.study.knobs import resolve_base

CELL_FILE = "cell.json"
DATA_DIR = "_data"


@contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes (cells of a Ray study preparing the same data set)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_model(source, device="cpu"):
    """Any model source (run directory, folder, base name) as (model, tokenizer)."""
    from pocketlm.io import load_model as _load

    return _load(source, device=device)


def cell_tokenizer(knobs: dict, study_dir: Path):
    from pocketlm.tokenizer import load_tokenizer

    if knobs["method"] == "pretrain":
        return load_tokenizer(knobs["tokenizer"])
    return load_tokenizer(resolve_base(knobs, study_dir))


def prepared_data(data: dict, tokenizer, study_dir: Path) -> Path:
    """The study's corpus tokenized with `tokenizer`: made once per tokenizer under DIR/_data, atomically."""
    if data.get("prepared"):
        return Path(data["prepared"])
    from pocketlm.atomic import AtomicDir
    from pocketlm.data.prepare import prepare

    spec = json.dumps({k: v for k, v in sorted(data.items())}, default=str)
    key = hashlib.sha256(f"{tokenizer.identity}\n{spec}".encode()).hexdigest()[:12]
    out = study_dir / DATA_DIR / f"{tokenizer.name.split('/')[-1]}-{key}"
    with _file_lock(study_dir / DATA_DIR / ".lock"):
        if not (out / "manifest.json").exists():
            options = {k: data[k] for k in ("delimiter", "delimiter_regex", "text_field", "column",
                                            "val_fraction", "val_documents", "seed") if data.get(k) is not None}
            if "val_fraction" not in options and "val_documents" not in options:
                options["val_fraction"] = 0.1
            # Small corpora are the point of many studies: the held-out split needs a few windows, not 1024.
            options["min_val_tokens"] = int(data.get("min_val_tokens") or 65)
            source = _materialize(data, study_dir / DATA_DIR / f"source-{key}.jsonl")
            if source != data["source"]:
                options.update(text_field="text")
            with AtomicDir(out) as tmp:
                prepare(source, tmp, tokenizer=tokenizer, progress=False, log=lambda _m: None, **options)
    return out


def _materialize(data: dict, jsonl: Path) -> str:
    """Sources `pocketlm prepare` does not read as they are, as JSONL with one document per line: a JSON
    file holding a list or mapping of texts (or of records with data.text_field), or the files of a folder
    matching data.glob (e.g. "*.fountain")."""
    source = Path(str(data["source"]))
    texts: list[str] | None = None
    if data.get("glob"):
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(source.glob(data["glob"]))]
        if not texts:
            raise UserError(f"no files match {data['glob']!r} in {source}")
    elif source.suffix.lower() == ".json":
        loaded = json.loads(source.read_text(encoding="utf-8"))
        items = list(loaded.values()) if isinstance(loaded, dict) else list(loaded)
        field = data.get("text_field") or "text"
        texts = [i if isinstance(i, str) else str(i.get(field, "")) for i in items]
    if texts is None:
        return str(source)
    from pocketlm.atomic import atomic_write_text

    atomic_write_text(jsonl, "".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
    return str(jsonl)


def _finished_training(run: Path) -> dict | None:
    from pocketlm.rundir import RunDir

    return RunDir(run).read_summary()


def _latest_step(run: Path) -> int:
    from pocketlm.rundir import RunDir

    latest = RunDir(run).checkpoint("latest")
    try:
        return int(latest.name.split("-")[-1]) if latest is not None else 0
    except ValueError:
        return 0


def _train_then_exit(knobs: dict, data_dir: str, run: str, parent: int, threads: int) -> None:
    import torch


    _watch_parent(parent)
    torch.set_num_threads(threads)  # the same reductions as the resumed half: losses equal to the bit
    train_cell({**knobs, "preempt_at": None}, Path(data_dir), Path(run))


def preempt(knobs: dict, data_dir: Path, run: Path) -> int:
    """Seed 000's hardware preemption: train in a separate process, kill it with SIGKILL as soon as it has
    checkpointed step `preempt_at`, and let the caller resume. Returns the step it was killed after."""
    import multiprocessing
    import os
    import signal

    ctx = multiprocessing.get_context("spawn")
    import torch

    process = ctx.Process(target=_train_then_exit, args=(knobs, str(data_dir), str(run), os.getpid(),
                                                         torch.get_num_threads()))
    process.start()
    while process.is_alive() and _latest_step(run) < knobs["preempt_at"]:
        time.sleep(0.05)
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
    process.join()
    return _latest_step(run)


def train_cell(knobs: dict, data_dir: Path, run: Path) -> dict:
    """Train (or resume) the cell's run; its training summary."""
    import torch

    from pocketlm.rundir import RunDir

    done = _finished_training(run)
    if done is not None:
        return done
    if knobs.get("preempt_at") and _latest_step(run) < knobs["preempt_at"] and not (run / "preempted").exists():
        step = preempt(knobs, data_dir, run)
        atomic_write_json(run / "preempted", {"killed_after_step": step})
        done = _finished_training(run)
        if done is not None:
            return done
    resume = RunDir(run).has_checkpoints()  # the trainer resumes from the newest complete step
    if not resume and run.exists():  # killed before its first checkpoint: nothing to resume from
        for child in run.iterdir():
            if child.name != "cell.log":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    base = resolve_base(knobs, run.parent) if knobs["method"] != "pretrain" else None
    cfg = K.to_train_config({**knobs, **({"base": base} if base else {})}, data=str(data_dir), out=str(run),
                            resume=resume)
    if knobs["method"] == "pretrain":
        from pocketlm.model import GPT, get_config
        from pocketlm.tokenizer import load_tokenizer
        from pocketlm.train import train

        tokenizer = load_tokenizer(data_dir)
        config = get_config(cfg.model, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.name)
        torch.manual_seed(cfg.seed)
        return train(GPT(config), tokenizer, cfg)
    from pocketlm.finetune import finetune
    from pocketlm.recipe import AdapterConfig

    adapter = AdapterConfig(rank=knobs["rank"], alpha=knobs["alpha"], dropout=knobs["lora_dropout"],
                            targets=knobs["targets"])
    qat = None
    if knobs.get("qat") and knobs["method"] in ("full", "lora"):  # QAT (LoRA: QAFT over the merged weight)
        from pocketlm.compress.qat import QATOptions

        qat = QATOptions(format=knobs["qat"])
    return finetune(cfg, adapter=adapter, lr_search=knobs.get("lr_search") or None,
                    lr_search_steps=knobs["lr_search_steps"], qat=qat)


def size_on_disk(source: Path) -> int | None:
    """Weights on disk: a run's best checkpoint (a LoRA run's adapter alone), a folder, or a .gguf file."""
    from pocketlm.rundir import RunDir

    source = Path(source)
    if source.is_file():
        return source.stat().st_size
    if not source.is_dir():  # a built-in base name
        from pocketlm.io.builtins import BUILTIN_BASES

        return BUILTIN_BASES[str(source)][0]().stat().st_size if str(source) in BUILTIN_BASES else None
    step = RunDir(source).checkpoint("best") or RunDir(source).checkpoint("latest") or source
    return sum(p.stat().st_size for p in step.rglob("*.safetensors"))


def run_cell(payload: dict) -> dict:
    """Run one cell to its results row. payload: {"study_dir", "cell": Cell.payload(), "data", "measures",
    "sampling"}. Never raises for a cell's own failure: the row says status "failed" and why."""
    from pocketlm.study.measure_run import measure_cell

    t0 = time.perf_counter()
    study_dir = Path(payload["study_dir"])
    cell = payload["cell"]
    run = study_dir / cell["id"]
    row = {"cell": cell["id"], "status": "failed", "knobs": cell["varied"], "repeat": cell["repeat"],
           "seed": cell["seed"], "method": cell["knobs"]["method"], "run_dir": cell["id"]}
    timing = {"prepare_s": 0.0, "train_s": 0.0, "post_training_s": 0.0, "measure_s": 0.0}
    try:
        for dep in cell["depends"]:
            dep_row = read_cell_row(study_dir / dep)
            if dep_row is None or dep_row.get("status") != "ok":
                raise UserError(f"it starts from cell {dep}, which did not finish")
        t = time.perf_counter()
        tokenizer = cell_tokenizer(cell["knobs"], study_dir)
        eval_dir = prepared_data(payload["data"], tokenizer, study_dir)
        corpus = cell["knobs"].get("corpus")
        data_dir = eval_dir if not corpus else prepared_data(
            {"source": corpus, "val_fraction": payload["data"].get("val_fraction", 0.1)}, tokenizer, study_dir)
        timing["prepare_s"] = time.perf_counter() - t
        source = run
        if cell["knobs"]["method"] == "none":  # the base as it is: nothing to train
            source = Path(resolve_base(cell["knobs"], study_dir))
            run.mkdir(parents=True, exist_ok=True)
            row.update(trainable_params=0, size_bytes=size_on_disk(source))
        else:
            t = time.perf_counter()
            summary = train_cell(cell["knobs"], data_dir, run)
            timing["train_s"] = time.perf_counter() - t
            row.update(_summary_fields(summary), size_bytes=size_on_disk(run))
        if (run / "preempted").exists():
            row["preempted_after_step"] = json.loads((run / "preempted").read_text())["killed_after_step"]
        t = time.perf_counter()
        for name, (_, _, apply) in K.post_training().items():
            if cell["knobs"].get(name) is not None:
                row["size_bytes_trained"] = row["size_bytes"]
                extra = apply(run, source, cell["knobs"], print)
                source = Path(extra.pop("_model_source", source))
                row.update(extra)
        timing["post_training_s"] = time.perf_counter() - t  # quantizing is the cell's work, not overhead
        t = time.perf_counter()
        row.update(measure_cell(payload, cell, source, eval_dir))  # the study's data, whatever the cell trained on
        timing["measure_s"] = time.perf_counter() - t
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failed cell is recorded and the study goes on
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        row["error"] = f"{type(exc).__name__}: {message}" if not isinstance(exc, UserError) else message
        traceback.print_exc(file=sys.stderr)
    total = time.perf_counter() - t0
    row.update({k: round(v, 3) for k, v in timing.items()})
    row["cell_s"] = round(total, 3)
    atomic_write_json(run / CELL_FILE, {"row": row, "settings": cell["knobs"]})
    return row


def _summary_fields(summary: dict) -> dict:
    out = {"trainable_params": summary.get("trainable_parameters"), "parameters": summary.get("parameters"),
           "peak_memory_bytes": summary.get("peak_memory_bytes"), "tokens_per_s": summary.get("tokens_per_s"),
           "steps": summary.get("steps"), "best_val_loss": summary.get("best_val_loss"),
           "stopped_early": summary.get("stopped_early"), "train_wall_s": summary.get("wall_s")}
    if summary.get("lr_search"):
        out["lr"] = summary["lr_search"]["best_lr"]
    return out


def read_cell_row(run: Path) -> dict | None:
    path = run / CELL_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["row"]
    except (json.JSONDecodeError, KeyError):
        return None


def _watch_parent(parent_pid: int) -> None:
    """End this worker when the study process is gone (killed with -9: nothing else would stop us)."""
    def loop() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            if os.getppid() == 1 and parent_pid != 1:
                os._exit(1)
            time.sleep(0.2)

    threading.Thread(target=loop, daemon=True, name="study-parent-watch").start()
