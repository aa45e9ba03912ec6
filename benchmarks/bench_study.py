"""Study goals: overhead per cell (everything but preparing data, training and measuring) under 5% of the
cell's time on a quick study, and a 50-cell report rendered in under 10 s.

    python benchmarks/bench_study.py --study seed-002-greentext --out /tmp/bench-study   # runs the quick study
    python benchmarks/bench_study.py --report-only                                        # just the report goal

Run it alone on the machine (the numbers are times). A study folder that already holds the finished quick
study is read, not run again: delete it to measure afresh.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def overhead(study: str, out: Path, threads: int | None) -> bool:
    from pocketlm.study import run_study

    t0 = time.perf_counter()
    rows = run_study(study, out, quick=True, threads=threads)
    wall = time.perf_counter() - t0
    print(f"{'cell':<40}{'cell s':>9}{'prepare':>9}{'train':>9}{'quantize':>9}{'measure':>9}{'overhead':>10}{'share':>8}")
    worst = 0.0
    for r in rows:
        share = (r.get("overhead_s") or 0) / r["cell_s"] if r.get("cell_s") else float("nan")
        worst = max(worst, share)
        print(f"{r['cell']:<40}{r.get('cell_s', 0):>9.1f}{r.get('prepare_s', 0):>9.1f}{r.get('train_s', 0):>9.1f}"
              f"{r.get('post_training_s', 0):>9.1f}{r.get('measure_s', 0):>9.1f}{r.get('overhead_s', 0):>10.2f}{share * 100:>7.1f}%")
    print(f"study wall time {wall:.1f} s; worst cell overhead {worst * 100:.1f}% (goal < 5%)")
    return worst < 0.05


def report_time(cells: int) -> bool:
    from test_study_report import synthetic_study

    from pocketlm.study.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        synthetic_study(Path(tmp) / "s", cells)
        t0 = time.perf_counter()
        write_report(Path(tmp) / "s")
        seconds = time.perf_counter() - t0
    print(f"report of {cells} cells: {seconds:.2f} s (goal < 10 s)")
    return seconds < 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="seed-002-greentext", help="built-in study or YAML (its quick variant)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-study"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cells", type=int, default=50, help="cells of the synthetic report")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    ok = report_time(args.cells)
    if not args.report_only:
        ok = overhead(args.study, args.out, args.threads) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
