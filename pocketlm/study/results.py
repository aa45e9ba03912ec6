"""DIR/results.jsonl and DIR/results.csv (one row per cell, rewritten atomically after each cell) and
DIR/study.json, which ties DIR to one study so that another study's results are never mixed in."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from pocketlm.atomic import atomic_write_json, atomic_write_text
from pocketlm.errors import UserError

STUDY_FILE = "study.json"
RESULTS = "results.jsonl"
RESULTS_CSV = "results.csv"
FORMAT = "pocketlm.study.v1"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def claim_dir(out: Path, study, cells) -> None:
    """Record which study DIR holds; refuse a DIR that holds another study's results."""
    path = out / STUDY_FILE
    identity = {"format": FORMAT, "study": study.name, "fingerprint": study.fingerprint(), "quick": study.quick,
                "file": study.path}
    if path.exists():
        held = json.loads(path.read_text())
        if held.get("fingerprint") != identity["fingerprint"]:
            what = "its quick variant" if held.get("study") == study.name and held.get("quick") != study.quick \
                else f"study {held.get('study')!r}" + (" with other settings" if held.get("study") == study.name else "")
            raise UserError(f"{out} holds results of {what} ({held.get('file')}): choose another --out, or delete "
                            f"{out} to start over")
    elif (out / RESULTS).exists():
        raise UserError(f"{out} holds a {RESULTS} but no {STUDY_FILE}: it is not this study's folder; choose "
                        "another --out")
    identity["cells"] = [c.id for c in cells]
    identity["description"] = study.description
    identity["claims"] = study.claims
    identity["lessons"] = study.lessons
    identity["measures"] = study.measures
    identity["primary"] = study.primary
    identity["repeats"] = study.repeats
    atomic_write_json(path, identity)


def read_identity(out: Path) -> dict:
    path = out / STUDY_FILE
    if not path.exists():
        raise UserError(f"{out} is not a study folder ({STUDY_FILE} is missing): give the --out of `pocketlm "
                        "study run`")
    return json.loads(path.read_text())


def read_results(out: Path) -> list[dict]:
    path = out / RESULTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_results(out: Path, rows: list[dict]) -> None:
    rows = [_clean(r) for r in rows]
    atomic_write_text(out / RESULTS, "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows))
    atomic_write_text(out / RESULTS_CSV, to_csv(rows))


def to_csv(rows: list[dict]) -> str:
    knob_keys: list[str] = []
    other: list[str] = []
    for r in rows:
        for k in r.get("knobs", {}):
            if k not in knob_keys:
                knob_keys.append(k)
        for k in r:
            if k != "knobs" and k not in other:
                other.append(k)
    head = ["cell", "status", *[f"knob.{k}" for k in knob_keys], *[k for k in other if k not in ("cell", "status")]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in rows:
        values = [r.get("cell"), r.get("status"), *[r.get("knobs", {}).get(k) for k in knob_keys],
                  *[r.get(k) for k in other if k not in ("cell", "status")]]
        w.writerow(["" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v) for v in values])
    return buf.getvalue()
