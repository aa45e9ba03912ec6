"""`run_study`: a study's cells, run (or continued) into DIR, with results written after every cell.

Resuming is by construction: a cell whose DIR/CELL/cell.json says it finished is read, not run again;
an interrupted cell resumes its run directory from its latest checkpoint (training resume is exact) and
keeps the measures it had; a failed cell stays failed unless `retry_failed`.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pocketlm.errors import UserError
from pocketlm.study import results as R
from pocketlm.study.cell import read_cell_row
from pocketlm.study.grid import Cell, expand, forgetting_reference, select
from pocketlm.study.spec import Study, load_study


def plan(study: Study, only: list[str] | None = None) -> list[Cell]:
    cells = expand(study)
    chosen = select(cells, only)
    ids = {c.id for c in chosen}
    by_id = {c.id: c for c in cells}
    pending = [d for c in chosen for d in c.depends]
    while pending:  # a chosen cell's starting cell runs too (and its starting cell ...)
        dep = pending.pop()
        if dep not in ids:
            ids.add(dep)
            pending += by_id[dep].depends
    return [c for c in cells if c.id in ids]


def format_plan(study: Study, cells: list[Cell]) -> str:
    keys: list[str] = []
    for c in cells:
        keys += [k for k in c.varied if k not in keys]
    lines = [f"study {study.name}{' (quick)' if study.quick else ''}: {len(cells)} cells, measures "
             f"{', '.join(study.measures)}"]
    width = max(len(c.id) for c in cells)
    for c in cells:
        knobs = "  ".join(f"{k}={c.varied[k]}" for k in keys if k in c.varied and k != "method")
        extra = f"  seed={c.seed}" if study.repeats > 1 else ""
        dep = f"  (after {', '.join(c.depends)})" if c.depends else ""
        lines.append(f"  {c.id:<{width}}  method={c.knobs['method']}  {knobs}{extra}{dep}")
    return "\n".join(lines)


def _prepare_data(study: Study, cells: list[Cell], out: Path) -> None:
    """The corpus tokenized for every tokenizer the cells need, before any cell runs: a corpus mistake is
    then one error, not a failed cell each. (Cells starting from another cell prepare theirs when they run.)"""
    from pocketlm.study.cell import cell_tokenizer, prepared_data

    seen: set[str] = set()
    for cell in cells:
        if cell.knobs["method"] != "pretrain" and str(cell.knobs["base"]).startswith("cell:"):
            continue
        tokenizer = cell_tokenizer(cell.knobs, out)
        if tokenizer.identity not in seen:
            seen.add(tokenizer.identity)
            prepared_data(study.data, tokenizer, out)


class _DirLock:
    """One `study run` per DIR at a time."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"

    def __enter__(self):
        self.f = self.path.open("a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self.f.close()
            raise UserError(f"another `pocketlm study run` is using {self.path.parent}: wait for it, or choose "
                            "another --out") from exc
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def run_study(study: str | Study, out: str | Path, *, quick: bool = False, only: list[str] | None = None,
              executor: str = "local", address: str | None = None, cpus_per_cell: float = 1,
              gpus_per_cell: float = 0, threads: int | None = None, retry_failed: bool = False,
              overrides: dict | None = None, progress: bool = True, ray_num_cpus: int | None = None) -> list[dict]:
    """Run (or continue) every cell of `study` into `out`; returns the results rows in grid order."""
    from pocketlm.study.executors import make_executor

    if not isinstance(study, Study):
        study = load_study(study, quick=quick, overrides=overrides)
    cells = plan(study, only)
    all_cells = expand(study)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    out.mkdir(parents=True, exist_ok=True)
    runner = make_executor(executor, address=address, cpus_per_cell=cpus_per_cell, gpus_per_cell=gpus_per_cell,
                           num_cpus=ray_num_cpus)
    with _DirLock(out):
        R.claim_dir(out, study, all_cells)
        rows = {r["cell"]: r for r in R.read_results(out)}
        for c in all_cells:  # finished after the last results write (killed in between)
            row = read_cell_row(out / c.id) if c.id not in rows else None
            if row is not None:
                rows[c.id] = row
        todo = [c for c in cells if c.id not in rows or (retry_failed and rows[c.id]["status"] == "failed")]
        order = [c.id for c in all_cells]

        def write() -> None:
            R.write_results(out, [rows[i] for i in order if i in rows])

        write()
        _prepare_data(study, todo, out)
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"study {study.name}", unit="cell",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        started: dict[str, float] = {}

        def on_start(payload: dict) -> None:
            started[payload["cell"]["id"]] = time.perf_counter()
            bar.set_postfix_str(f"running {payload['cell']['id']}")

        def on_result(payload: dict, row: dict) -> None:
            cid = payload["cell"]["id"]
            wall = time.perf_counter() - started.get(cid, time.perf_counter())
            if runner.name == "local":  # the parent's view: process start and hand-over included
                row["cell_s"] = round(wall, 3)
            work = sum(row.get(k) or 0.0 for k in ("prepare_s", "train_s", "post_training_s", "measure_s"))
            row["overhead_s"] = round(max(0.0, row.get("cell_s", wall) - work), 3)
            rows[cid] = row
            write()
            bar.update(1)
            if row["status"] != "ok":
                tqdm.write(f"cell {cid} failed: {row.get('error')}", file=sys.stderr)

        payloads = [{"study_dir": str(out.resolve()),
                     "cell": {**c.payload(), "reference": forgetting_reference(c, all_cells)}, "data": study.data,
                     "measures": study.measures, "sampling": study.sampling, "threads": threads}
                    for c in todo]
        try:
            runner.execute(payloads, on_result, on_start)
        finally:
            bar.close()
    return [rows[i] for i in order if i in rows]


def default_threads() -> int | None:
    value = os.environ.get("POCKETLM_STUDY_THREADS")
    return int(value) if value else None
