"""Evaluation results as JSON (what was evaluated, on which exact data, how, and the numbers) and as a
readable table for the terminal.

The JSON keeps every headline number at the top level under its metric name (loss, perplexity,
bits_per_byte, acc, acc_norm, chrf, pass_rate, ...), and the same numbers under "metrics"; inputs are
identified by the sha256 of their files, so two reports can be checked to be on the same data.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from pocketlm.atomic import atomic_write_json

FORMAT = "pocketlm.eval.v1"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def data_hashes(paths: list[str | Path]) -> dict[str, str]:
    """{path: sha256} for every file (a folder's files, sorted, for folders)."""
    out = {}
    for p in paths:
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = sha256_file(f)
    return out


def _clean(value):
    """JSON has no NaN or infinity: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def build_report(*, model: str | None, adapter: str | None, data: dict[str, str], settings: dict,
                 metrics: dict, sections: dict | None = None, extra: dict | None = None) -> dict:
    report = {"format": FORMAT, "model": model, "adapter": adapter, "data": data, "settings": settings,
              **metrics, "metrics": dict(metrics)}
    report.update(sections or {})
    report.update(extra or {})
    return _clean(report)


def write_report(path: str | Path, report: dict) -> None:
    atomic_write_json(path, _clean(report))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}"
    return str(value)


def format_table(report: dict) -> str:
    """Metric | value rows, then the forgetting comparison if there is one."""
    rows = [("model", report.get("model") or "none")]
    if report.get("adapter"):
        rows.append(("adapter", report["adapter"]))
    rows += [(k, _fmt(v)) for k, v in (report.get("metrics") or {}).items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    forgetting = report.get("forgetting") or {}
    if forgetting:
        lines.append("")
        lines.append(f"{'forgetting':<14}{'before':>12}{'after':>12}{'delta':>12}")
        for k, v in forgetting.items():
            lines.append(f"{k:<14}{_fmt(v['before']):>12}{_fmt(v['after']):>12}{_fmt(v['delta']):>12}")
    return "\n".join(lines)
