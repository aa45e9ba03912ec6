"""`pocketlm study report DIR`: DIR/report.md (figures in DIR/report_files/) and DIR/report.html, a single
file with every figure inlined as SVG data, so it opens offline and fetches nothing.

Sections: the seed's claims, the results table (mean ± spread over repeats), Pareto fronts of the primary
quality measure against each cost with the front highlighted, validation curves of every cell, the loss
against the other quality measures, quiet failures, samples per cell, failed cells and the study's own
overhead.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from pathlib import Path

from pocketlm.atomic import atomic_write_text
from pocketlm.errors import UserError
from pocketlm.rundir import RunDir
from pocketlm.study import figures as F
from pocketlm.study import results as R
from pocketlm.study.measures import COSTS, lower_is_better
from pocketlm.study.quiet import quiet_failures

QUALITY_ORDER = ["bits_per_byte", "val_loss", "chrf", "form_pass_rate", "hellaswag_acc", "zero_shot_acc",
                 "forgetting_bpb", "kl_from_base"]
COST_ORDER = ["trainable_params", "peak_memory_bytes", "tokens_per_s", "size_bytes", "decode_tokens_per_s"]
TABLE_COLUMNS = QUALITY_ORDER + ["chrf_form_pass_rate", "best_val_loss", "lr", *COST_ORDER, "train_s", "steps"]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(rows: list[dict]) -> list[dict]:
    """One group per distinct knobs (repeats together): {"name", "n", "cells", col: (mean, std)}."""
    groups: dict[str, dict] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        key = json.dumps(r.get("knobs", {}), sort_keys=True, default=str)
        g = groups.setdefault(key, {"name": r["cell"].rsplit("_rep", 1)[0], "knobs": r.get("knobs", {}),
                                    "rows": []})
        g["rows"].append(r)
    out = []
    for g in groups.values():
        agg = {"name": g["name"], "knobs": g["knobs"], "n": len(g["rows"]), "cells": [r["cell"] for r in g["rows"]],
               "method": g["rows"][0].get("method")}  # shown where method is not an axis of the cell
        columns = {k for r in g["rows"] for k, v in r.items() if _num(v)}
        for col in columns:
            vals = [r[col] for r in g["rows"] if _num(r.get(col))]
            if vals:
                agg[col] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out.append(agg)
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def _fmt(col: str, value: float) -> str:
    if col in ("trainable_params", "steps"):
        return f"{value:,.0f}"
    if col in ("peak_memory_bytes", "size_bytes"):
        return _bytes(value)
    if col in ("tokens_per_s", "decode_tokens_per_s"):
        return f"{value:,.0f}"
    if col in ("lr",) or (value != 0 and abs(value) < 0.01):
        return f"{value:.3g}"
    if col in ("chrf",):
        return f"{value:.2f}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"


def _cell_text(col: str, pair) -> str:
    if not pair:
        return "–"
    mean, std = pair
    return _fmt(col, mean) + (f" ± {_fmt(col, std)}" if std else "")


def primary_quality(identity: dict, groups: list[dict]) -> str | None:
    if identity.get("primary"):
        return identity["primary"]
    return next((c for c in QUALITY_ORDER if any(c in g for g in groups)), None)


def _table(groups: list[dict]) -> tuple[list[str], list[list[str]]]:
    knob_keys: list[str] = []
    for g in groups:
        knob_keys += [k for k in g["knobs"] if k not in knob_keys]
    cols = [c for c in TABLE_COLUMNS if any(c in g for g in groups)]
    head = ["cell", *knob_keys, *( ["n"] if any(g["n"] > 1 for g in groups) else []),
            *[F.LABELS.get(c, c) for c in cols]]
    body = []
    for g in groups:
        knobs = {"method": g.get("method"), **g["knobs"]}
        row = [g["name"], *["" if knobs.get(k) is None else str(knobs[k]) for k in knob_keys]]
        if any(x["n"] > 1 for x in groups):
            row.append(str(g["n"]))
        row += [_cell_text(c, g.get(c)) for c in cols]
        body.append(row)
    return head, body


def _curves(out: Path, rows: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for r in rows:
        run = RunDir(out / r.get("run_dir", r["cell"]))
        if not run.metrics_path.exists():
            continue
        curves[r["cell"]] = [(m["step"], m[key]) for m in run.read_metrics() if _num(m.get(key))]
    return curves


def _samples(out: Path, rows: list[dict], per_cell: int = 2) -> dict[str, list[dict]]:
    found = {}
    for r in rows:
        items = []
        for name in ("study_samples.jsonl", "study_generations.jsonl"):
            path = out / r.get("run_dir", r["cell"]) / name
            if path.exists():
                for line in path.read_text().splitlines()[:per_cell]:
                    d = json.loads(line)
                    text = d.get("text", d.get("completion", ""))
                    passed = (d.get("form") or {}).get("passed")
                    items.append({"prompt": d.get("prompt", ""), "text": text, "passed": passed, "kind": name})
        if items:
            found[r["cell"]] = items
    return found


def _losses(out: Path, row: dict) -> list:
    rows = RunDir(out / row.get("run_dir", row["cell"])).read_metrics()
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]


def resume_checks(out: Path, rows: list[dict]) -> list[str]:
    """Cells killed mid-training (preempt_at) against their uninterrupted twin: every logged loss equal?"""
    lines = []
    for r in rows:
        if r.get("status") != "ok" or r.get("preempted_after_step") is None:
            continue
        twin_knobs = {k: v for k, v in r["knobs"].items() if k != "preempt_at"}
        twin = next((t for t in rows if t is not r and t.get("status") == "ok" and t.get("repeat") == r.get("repeat")
                     and {k: v for k, v in t["knobs"].items() if k != "preempt_at"} == twin_knobs
                     and t["knobs"].get("preempt_at") is None), None)
        if twin is None:
            lines.append(f"{r['cell']}: killed after step {r['preempted_after_step']} and resumed (no uninterrupted "
                         "twin cell to compare with)")
            continue
        a, b = _losses(out, r), _losses(out, twin)
        same = a == b and bool(a)
        lines.append(f"{r['cell']}: killed (SIGKILL) after step {r['preempted_after_step']} and resumed; its "
                     f"{len(a)} logged losses {'all equal' if same else 'DIFFER from'} {twin['cell']}'s "
                     f"uninterrupted run")
    return lines


def build(out: Path) -> dict:
    """Everything the report shows, computed once for both formats."""
    identity = R.read_identity(out)
    rows = R.read_results(out)
    if not rows:
        raise UserError(f"{out} has no results yet: run `pocketlm study run STUDY --out {out}` first")
    groups = aggregate(rows)
    quality = primary_quality(identity, groups)
    figs: list[tuple[str, str, str]] = []  # (id, caption, svg)
    if quality:
        for cost in COST_ORDER:
            svg = F.pareto_figure(groups, cost, quality)
            if svg:
                figs.append((f"pareto-{cost}", f"{F.LABELS[quality]} against {F.LABELS[cost]}: the Pareto front "
                             "(red) holds the cells no other cell beats on both", svg))
    curves = _curves(out, [r for r in rows if r.get("status") == "ok"], "val_loss")
    svg = F.curves_figure(curves)
    if svg:
        figs.append(("curves", "validation loss of every cell during training", svg))
    loss = next((c for c in ("bits_per_byte", "val_loss") if any(c in g for g in groups)), None)
    for other in ("chrf", "form_pass_rate", "hellaswag_acc", "zero_shot_acc", "forgetting_bpb", "kl_from_base"):
        if loss and any(other in g for g in groups):
            svg = F.agreement_figure(groups, loss, other)
            if svg:
                figs.append((f"agree-{other}", f"{F.LABELS[loss]} against {F.LABELS[other]}: where the two "
                             "disagree, the loss alone misleads", svg))
    ok = [r for r in rows if r.get("status") == "ok"]
    cell_s = sum(r.get("cell_s") or 0 for r in ok)
    overhead = sum(r.get("overhead_s") or 0 for r in ok)
    return {"identity": identity, "rows": rows, "groups": groups, "quality": quality, "figures": figs,
            "table": _table(groups), "quiet": quiet_failures(groups, quality),
            "resume": resume_checks(out, rows),
            "failed": [r for r in rows if r.get("status") != "ok"], "samples": _samples(out, ok),
            "time": {"cells_s": cell_s, "overhead_s": overhead,
                     "overhead_share": overhead / cell_s if cell_s else None,
                     "max_cell_overhead_share": max(((r.get("overhead_s") or 0) / r["cell_s"] for r in ok
                                                     if r.get("cell_s")), default=None)}}


def _md(data: dict, fig_dir: str) -> str:
    ident = data["identity"]
    lines = [f"# Study {ident['study']}{' (quick)' if ident.get('quick') else ''}", "", ident.get("description", ""), ""]
    n_ok = len(data["rows"]) - len(data["failed"])
    t = data["time"]
    lines.append(f"{n_ok} of {len(data['rows'])} cells ok; {t['cells_s'] / 60:.1f} min in cells, study overhead "
                 f"{(t['overhead_share'] or 0) * 100:.1f}% (worst cell {(t['max_cell_overhead_share'] or 0) * 100:.1f}%).")
    if ident.get("claims"):
        lines += ["", "## What the seed claims", ""] + [f"- {c}" for c in ident["claims"]]
    head, body = data["table"]
    lines += ["", "## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(x.replace("|", "\\|") for x in row) + " |" for row in body]
    lines += ["", "## Quiet failures", ""]
    lines += [f"- {q}" for q in data["quiet"]] or ["- none found: where the loss is good, the other measures agree."]
    if data["resume"]:
        lines += ["", "## Preemption and resume", ""] + [f"- {x}" for x in data["resume"]]
    lines += ["", "## Figures", ""]
    for fid, caption, _ in data["figures"]:
        lines += [f"![{caption}]({fig_dir}/{fid}.svg)", "", f"*{caption}*", ""]
    if data["samples"]:
        lines += ["## Samples", ""]
        for cell, items in data["samples"].items():
            lines.append(f"### {cell}")
            for s in items:
                mark = "" if s["passed"] is None else (" (form: pass)" if s["passed"] else " (form: fail)")
                lines += ["", f"```text{mark}", (s["prompt"] + s["text"]).replace("```", "'''"), "```"]
            lines.append("")
    if data["failed"]:
        lines += ["## Failed cells", ""] + [f"- {r['cell']}: {r.get('error')}" for r in data["failed"]]
    return "\n".join(lines) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:8px;vertical-align:top;
max-width:520px}figure img{max-width:100%}figcaption{font-size:12px;color:#555}pre{background:#f6f6f6;
padding:6px;white-space:pre-wrap;font-size:12px}.pass{color:#1a7f37}.fail{color:#b42318}.warn{color:#b42318}"""


def _html(data: dict) -> str:
    e = html.escape
    ident = data["identity"]
    t = data["time"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Study {e(ident['study'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Study {e(ident['study'])}{' (quick)' if ident.get('quick') else ''}</h1>",
             f"<p>{e(ident.get('description', ''))}</p>",
             f"<p>{len(data['rows']) - len(data['failed'])} of {len(data['rows'])} cells ok; "
             f"{t['cells_s'] / 60:.1f} min in cells; study overhead {(t['overhead_share'] or 0) * 100:.1f}%.</p>"]
    if ident.get("claims"):
        parts.append("<h2>What the seed claims</h2><ul>" + "".join(f"<li>{e(c)}</li>" for c in ident["claims"])
                     + "</ul>")
    head, body = data["table"]
    parts.append("<h2>Results</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in body) + "</table>")
    parts.append("<h2>Quiet failures</h2><ul>" + ("".join(f"<li class='warn'>{e(q)}</li>" for q in data["quiet"])
                 or "<li>none found: where the loss is good, the other measures agree.</li>") + "</ul>")
    if data["resume"]:
        parts.append("<h2>Preemption and resume</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in data["resume"])
                     + "</ul>")
    parts.append("<h2>Figures</h2>")
    for fid, caption, svg in data["figures"]:
        uri = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
        parts.append(f"<figure id='{fid}'><img alt='{e(caption)}' src='{uri}'><figcaption>{e(caption)}"
                     "</figcaption></figure>")
    if data["samples"]:
        parts.append("<h2>Samples</h2>")
        for cell, items in data["samples"].items():
            passed = [s["passed"] for s in items if s["passed"] is not None]
            summary = f" ({sum(passed)}/{len(passed)} pass the form check)" if passed else ""
            parts.append(f"<details><summary>{e(cell)}{summary}</summary>")
            for s in items:
                mark = "" if s["passed"] is None else (" <span class='pass'>form: pass</span>" if s["passed"]
                                                      else " <span class='fail'>form: fail</span>")
                parts.append(f"<pre>{e(s['prompt'])}<b>{e(s['text'])}</b></pre>{mark}")
            parts.append("</details>")
    if data["failed"]:
        parts.append("<h2>Failed cells</h2><ul>" + "".join(f"<li>{e(r['cell'])}: {e(str(r.get('error')))}</li>"
                                                            for r in data["failed"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: str | Path) -> dict:
    """Write DIR/report.md (+ DIR/report_files/*.svg) and DIR/report.html; their paths."""
    out = Path(out)
    data = build(out)
    fig_dir = out / "report_files"
    fig_dir.mkdir(exist_ok=True)
    for fid, _, svg in data["figures"]:
        atomic_write_text(fig_dir / f"{fid}.svg", svg)
    atomic_write_text(out / "report.md", _md(data, "report_files"))
    atomic_write_text(out / "report.html", _html(data))
    return {"md": out / "report.md", "html": out / "report.html", "figures": len(data["figures"])}


__all__ = ["write_report", "build", "aggregate", "lower_is_better", "COSTS"]
