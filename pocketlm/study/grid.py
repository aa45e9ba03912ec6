"""From a study to its cells: axes cross as a grid, groups move together, exclusions drop cells, cells
that differ only in knobs their method ignores are one cell, and repeats run each cell with its own seed.

A cell's name is made of the knobs that vary across the study (`method-lora_rank-8`), so its run
directory says what it is. `base: cell:NAME` makes a cell start from another cell's result; such cells
run after the cell they name.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from pocketlm.errors import UserError
from pocketlm.study import knobs as K
from pocketlm.study.spec import Study


@dataclass
class Cell:
    id: str
    knobs: dict  # every knob, merged: base recipe + this cell's axis values
    varied: dict  # the axis values that define this cell (what the report's table shows)
    repeat: int
    seed: int
    depends: list[str] = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # group axis -> bundle name

    def payload(self) -> dict:
        return {"id": self.id, "knobs": self.knobs, "varied": self.varied, "repeat": self.repeat,
                "seed": self.seed, "depends": self.depends}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", str(text).split("/")[-1] if "/" in str(text) and not
                  str(text).startswith("cell:") else str(text)).strip("-") or "x"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _dimension_choices(axis: dict) -> list[tuple[dict, dict, str | None]]:
    """(knob values, labels, name part) for each value of an axis."""
    if axis["kind"] == "knob":
        return [({axis["name"]: v}, {}, None) for v in axis["values"]]
    out = []
    for bundle in axis["values"]:
        label = bundle["name"] or "-".join(f"{k}-{_fmt(v)}" for k, v in bundle["knobs"].items())
        out.append((dict(bundle["knobs"]), {axis["name"]: label}, label))
    return out


def _matches(entry: dict, knobs: dict, labels: dict) -> bool:
    for key, value in entry.items():
        have = labels[key] if key in labels else knobs.get(key)
        if have != value:
            return False
    return True


def expand(study: Study) -> list[Cell]:
    dims = [_dimension_choices(a) for a in study.axes]
    varying = [len(d) > 1 for d in dims]
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for combo in itertools.product(*dims) if dims else [()]:
        knobs = dict(study.base)
        varied: dict = {}
        labels: dict = {}
        parts = []
        for (values, lab, part), axis, vary in zip(combo, study.axes, varying):
            knobs.update(values)
            varied.update(values)
            labels.update(lab)
            if vary:
                parts.append((_slug(part), None) if part is not None else
                             (f"{axis['name']}-{_slug(_fmt(values[axis['name']]))}", axis["name"]))
        if any(_matches(e, knobs, labels) for e in study.exclude):
            continue
        effective = K.relevant(knobs)
        signature = repr(sorted((k, repr(v)) for k, v in effective.items()))
        if signature in seen:
            continue  # e.g. a full fine-tune crossed with LoRA ranks: one full fine-tune
        name = "_".join(p for p, knob in parts if knob is None or knob in effective) or "base"
        seen[signature] = name
        shown = {k: v for k, v in varied.items() if k in effective}
        cells.append(Cell(id=name, knobs=knobs, varied=shown, repeat=0, seed=int(knobs["seed"]), labels=labels))
    if not cells:
        raise UserError(f"{study.where('axes')}: the axes and exclusions leave no cell to run: remove an "
                        "exclusion or add axis values")
    _unique_ids(cells)
    cells = _with_repeats(cells, study.repeats)
    _check_cells(study, cells)
    return _ordered(study, cells)


def _unique_ids(cells: list[Cell]) -> None:
    counts: dict[str, int] = {}
    for cell in cells:
        n = counts.get(cell.id, 0)
        counts[cell.id] = n + 1
        if n:
            cell.id = f"{cell.id}-{n + 1}"


def _with_repeats(cells: list[Cell], repeats: int) -> list[Cell]:
    if repeats == 1:
        return cells
    out = []
    for cell in cells:
        for r in range(repeats):
            knobs = {**cell.knobs, "seed": int(cell.knobs["seed"]) + r}
            out.append(Cell(id=f"{cell.id}_rep{r + 1}", knobs=knobs, varied=cell.varied, repeat=r,
                            seed=knobs["seed"], labels=cell.labels))
    return out


def _locate(study: Study, cell: Cell, key: str) -> tuple:
    """The study-file path that set `key` for this cell (an axis value, else the base recipe)."""
    for axis in study.axes:
        if axis["kind"] == "knob" and axis["name"] == key:
            return ("axes", key, axis["values"].index(cell.knobs[key]) if cell.knobs[key] in axis["values"] else 0)
        if axis["kind"] == "group":
            for i, bundle in enumerate(axis["values"]):
                if key in bundle["knobs"] and all(cell.knobs.get(k) == v for k, v in bundle["knobs"].items()):
                    return ("axes", axis["name"], i, key)
    return ("base", key) if ("base", key) in study.lines else ("base",)


def _check_cells(study: Study, cells: list[Cell]) -> None:
    ids = {c.id for c in cells}
    for cell in cells:
        try:
            K.check_cell(cell.knobs)
        except UserError as exc:
            key = _blame(str(exc), cell.knobs)
            raise UserError(f"{study.where(*_locate(study, cell, key))}: cell {cell.id}: {exc}") from exc
        base = str(cell.knobs.get("base", ""))
        if cell.knobs["method"] != "pretrain" and base.startswith("cell:"):
            target = base[5:]
            if cell.repeat or study.repeats > 1:
                target = f"{target}_rep{cell.repeat + 1}"
            if target not in ids:
                raise UserError(f"{study.where(*_locate(study, cell, 'base'))}: {base} names no cell of this "
                                f"study (cells: {', '.join(sorted(ids))})")
            if target == cell.id:
                raise UserError(f"{study.where(*_locate(study, cell, 'base'))}: cell {cell.id} cannot start from itself")
            cell.depends = [target]
            cell.knobs = {**cell.knobs, "base": f"cell:{target}"}  # repeat N starts from the other cell's repeat N


def _blame(message: str, knobs: dict) -> str:
    """The knob an error message is about (its first word that names a knob)."""
    for word in re.findall(r"[A-Za-z_][A-Za-z_-]*", message):
        w = word.replace("-", "_").lower()
        if w in knobs:
            return w
    if "LoRA" in message:
        return "rank"
    return "method"


def _ordered(study: Study, cells: list[Cell]) -> list[Cell]:
    """Grid order, except that a cell comes after the cell it starts from."""
    done: set[str] = set()
    out: list[Cell] = []
    pending = list(cells)
    while pending:
        ready = [c for c in pending if all(d in done for d in c.depends)]
        if not ready:
            raise UserError(f"{study.where('axes')}: cells start from each other in a circle "
                            f"({', '.join(c.id for c in pending)})")
        for c in ready:
            out.append(c)
            done.add(c.id)
        pending = [c for c in pending if c.id not in done]
    return out


def select(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """The cells whose name matches one of the patterns (shell-style, e.g. 'method-lora*')."""
    if not only:
        return cells
    import fnmatch

    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in only)]
    if not chosen:
        raise UserError(f"--only {' '.join(only)} matches no cell: the cells are {', '.join(c.id for c in cells)}")
    return chosen


def forgetting_reference(cell: Cell, cells: list[Cell]) -> str | None:
    """The model a cell's forgetting is measured against: where its chain of cells starts -- the study's
    pretrained base, or a from-scratch cell's run (as `cell:NAME`). Every cell of a chain then has the same
    reference, so their forgetting compares; a quantized copy of a fine-tune is measured against the base the
    fine-tune forgot from, not against the fine-tune. None for a from-scratch cell (nothing to forget)."""
    by_id = {c.id: c for c in cells}
    seen: set[str] = set()
    while cell.knobs["method"] != "pretrain":
        base = str(cell.knobs["base"])
        if not base.startswith("cell:") or base[5:] not in by_id or base[5:] in seen:
            return base
        seen.add(base[5:])
        cell = by_id[base[5:]]
        if cell.knobs["method"] == "pretrain":
            return f"cell:{cell.id}"
    return None

