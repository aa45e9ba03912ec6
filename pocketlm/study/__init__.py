"""Studies: grids of knobs run side by side into one folder, with a report (see docs/studies.md).

- spec.py / yamlines.py  study files (YAML), errors with line numbers
- knobs.py               what can be an axis, and the checks of its values
- grid.py                axes -> cells (groups, exclusions, repeats, cells that start from cells)
- runner.py              run_study: resume, results after every cell, progress
- executors.py           local (a worker process per cell) and Ray
- cell.py, measure_run.py  one cell: data, training, measures
- measures.py            the measures and their directions
- results.py             results.jsonl / results.csv / study.json
- report.py, figures.py  report.md and the self-contained report.html
"""

from __future__ import annotations


def load_study(name_or_path: str, *, quick: bool = False, overrides: dict | None = None):
    from pocketlm.study.spec import load_study as _load

    return _load(name_or_path, quick=quick, overrides=overrides)


def run_study(study, out, **kwargs) -> list[dict]:
    from pocketlm.study.runner import run_study as _run

    return _run(study, out, **kwargs)


def write_report(out) -> dict:
    from pocketlm.study.report import write_report as _write

    return _write(out)


def describe_builtins(knobs: bool = False) -> str:
    from pocketlm.study.catalog import describe

    return describe(knobs)


__all__ = ["load_study", "run_study", "write_report", "describe_builtins"]
