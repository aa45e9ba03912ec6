"""Study files: a base recipe, the data, the axes, the measures and repeats, read from YAML.

Every mistake is a one-line UserError that names the file, the line and the key, raised before anything
runs. `--quick` merges the file's `quick:` section over the rest (mappings merge, lists replace).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.study import knobs as K
from pocketlm.study import yamlines
from pocketlm.study.knobs import expand_path

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
TOP_KEYS = {"study", "description", "claims", "recipe", "data", "base", "axes", "exclude", "repeats",
            "measures", "sampling", "primary", "quick", "lessons"}
DATA_KEYS = {"source", "prepared", "glob", "min_val_tokens", "delimiter", "delimiter_regex", "text_field", "column", "val_fraction",
             "val_documents", "seed"}
SAMPLING_KEYS = {"prompts", "n", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                 "stop", "seed"}


@dataclass
class Study:
    name: str
    path: str
    description: str
    claims: list[str]
    data: dict
    base: dict  # knob -> value: every knob, defaults filled in
    axes: list[dict]  # [{"name", "kind": "knob"|"group", "values": [...], "line"}]
    exclude: list[dict]
    repeats: int
    measures: dict  # measure name -> options
    sampling: dict
    primary: str | None
    lessons: list[dict]
    quick: bool
    lines: dict = field(repr=False, default_factory=dict)
    raw: dict = field(repr=False, default_factory=dict)

    def where(self, *path) -> str:
        line = yamlines.line_of(self.lines, tuple(path))
        key = yamlines.dotted(tuple(path))
        return f"{self.path} line {line}, {key}" if line else f"{self.path}, {key}"

    def fingerprint(self) -> str:
        """What makes two studies the same study: everything that changes a cell's numbers."""
        keep = {k: v for k, v in self.raw.items() if k not in ("description", "claims", "lessons", "quick")}
        keep["__quick"] = self.quick
        text = json.dumps(keep, sort_keys=True, default=str)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def study_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = STUDIES_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    raise UserError(f"no study {name_or_path!r}: give a study YAML file or a built-in study "
                    f"({', '.join(builtin_names())}; `pocketlm study list`)")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def _merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def load_study(name_or_path: str, *, quick: bool = False, overrides: dict | None = None) -> Study:
    """Read, merge `quick:` if asked, apply `overrides` (knob -> value over the base recipe; `data` -> source),
    and check everything that can be checked without running."""
    path = study_path(name_or_path)
    raw, lines = yamlines.load(path.read_text(encoding="utf-8"), str(path))
    name = str(path)
    if not isinstance(raw, dict):
        raise UserError(f"{name} line 1: a study file is a mapping with `study`, `data`, `base`, `axes`, "
                        "`measures` (see docs/studies.md)")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        k = unknown[0]
        raise UserError(f"{name} line {lines.get((k,))}: unknown key {k!r}: valid keys are {', '.join(sorted(TOP_KEYS))}")
    if quick:
        q = raw.get("quick")
        if q is None:
            raise UserError(f"{name}: --quick asked for, but the study has no `quick:` section")
        if not isinstance(q, dict):
            raise UserError(f"{name} line {lines.get(('quick',))}: quick must be a mapping of overrides")
        raw = _merge({k: v for k, v in raw.items() if k != "quick"}, q)
        lines = {**lines, **{p[1:]: ln for p, ln in lines.items() if p[:1] == ("quick",) and len(p) > 1}}
    for key, value in (overrides or {}).items():
        if key == "data":
            kept = {k: v for k, v in (raw.get("data") or {}).items() if k in ("val_fraction", "val_documents", "seed")}
            kept["source" if not (Path(value) / "manifest.json").exists() else "prepared"] = str(Path(value).resolve()) \
                if value != "shakespeare" else value
            raw["data"] = kept
        elif key == "delimiter":
            raw.setdefault("data", {})["delimiter"] = value
        else:
            if key == "base" and Path(str(value)).expanduser().exists():
                value = str(Path(str(value)).expanduser().resolve())  # cells may run elsewhere (Ray)
            raw.setdefault("base", {})[key] = value
    study = Study(name=str(raw.get("study") or path.stem), path=name, description=str(raw.get("description") or ""),
                  claims=[str(c) for c in (raw.get("claims") or [])], data={}, base={}, axes=[], exclude=[],
                  repeats=1, measures={}, sampling={}, primary=raw.get("primary"), lessons=[], quick=quick,
                  lines=lines, raw=raw)
    _parse(study, raw, path.parent)
    return study


def _need_mapping(study: Study, value, *path) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{study.where(*path)}: must be a mapping (key: value lines)")
    return value


def _parse(study: Study, raw: dict, here: Path) -> None:
    from pocketlm.study.measures import parse_measures

    study.data = _parse_data(study, _need_mapping(study, raw.get("data"), "data"), here)
    study.base = _parse_base(study, raw)
    study.axes = _parse_axes(study, _need_mapping(study, raw.get("axes"), "axes"))
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise UserError(f"{study.where('exclude')}: must be a list of mappings, e.g. - {{method: full, rank: 8}}")
    axis_names = {a["name"] for a in study.axes}
    for i, entry in enumerate(exclude):
        clean = {}
        for key, value in entry.items():
            if key in axis_names and _axis(study, key)["kind"] == "group":
                clean[key] = str(value)  # a group value, by its name
            else:
                _knob_or_fail(study, key, ("exclude", i, key))
                clean[key] = _coerce(study, key, value, ("exclude", i, key))
        study.exclude.append(clean)
    repeats = raw.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"{study.where('repeats')}: repeats must be a positive integer, got {repeats!r}")
    study.repeats = repeats
    study.sampling = _need_mapping(study, raw.get("sampling"), "sampling")
    for key in study.sampling:
        if key not in SAMPLING_KEYS:
            raise UserError(f"{study.where('sampling', key)}: unknown sampling setting {key!r}: valid are "
                            f"{', '.join(sorted(SAMPLING_KEYS))}")
    study.measures = parse_measures(study, raw.get("measures"), here)
    if study.primary is not None and study.primary not in _quality_names(study):
        raise UserError(f"{study.where('primary')}: primary {study.primary!r} is not a quality measure of this "
                        f"study ({', '.join(_quality_names(study))})")
    study.lessons = raw.get("lessons") or []


def _quality_names(study: Study) -> list[str]:
    from pocketlm.study.measures import quality_columns

    return quality_columns(study.measures)


def _parse_data(study: Study, data: dict, here: Path) -> dict:
    for key in data:
        if key not in DATA_KEYS:
            raise UserError(f"{study.where('data', key)}: unknown data setting {key!r}: valid are "
                            f"{', '.join(sorted(DATA_KEYS))}")
    if not data.get("source") and not data.get("prepared"):
        raise UserError(f"{study.where('data')}: give data.source (a corpus `pocketlm prepare` reads) or "
                        "data.prepared (a prepared folder), or pass --data PATH")
    out = dict(data)
    for key in ("source", "prepared"):
        if out.get(key):
            try:
                out[key] = expand_path(out[key], here)
            except UserError as exc:
                raise UserError(f"{study.where('data', key)}: {exc}") from exc
            if out[key] != "shakespeare" and not Path(out[key]).exists():
                raise UserError(f"{study.where('data', key)}: {out[key]} does not exist: fix the path or pass "
                                "--data PATH")
    return out


def _coerce(study: Study, key: str, value, path: tuple):
    try:
        return K.coerce(key, value)
    except UserError as exc:
        raise UserError(f"{study.where(*path)}: {exc}") from exc


def _knob_or_fail(study: Study, key: str, path: tuple) -> None:
    try:
        K.knob(key)
    except UserError as exc:
        raise UserError(f"{study.where(*path)}: {exc}") from exc


def _parse_base(study: Study, raw: dict) -> dict:
    from dataclasses import asdict

    from pocketlm.recipe import TrainConfig, load_recipe

    values = {k: v for k, v in asdict(TrainConfig()).items() if k not in K._NOT_KNOBS}
    values.update(K.DEFAULTS)
    if raw.get("recipe"):
        try:
            recipe = load_recipe(str(raw["recipe"]))
        except UserError as exc:
            raise UserError(f"{study.where('recipe')}: {exc}") from exc
        values.update({k: v for k, v in asdict(recipe).items() if k not in K._NOT_KNOBS})
        values["arch" if recipe.method == "pretrain" else "base"] = recipe.model
    for key, value in _need_mapping(study, raw.get("base"), "base").items():
        _knob_or_fail(study, key, ("base", key))
        values[key] = _coerce(study, key, value, ("base", key))
    return values


def _axis(study: Study, name: str) -> dict:
    return next(a for a in study.axes if a["name"] == name)


def _parse_axes(study: Study, axes: dict) -> list[dict]:
    out = []
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{study.where('axes', name)}: an axis is a non-empty list of values, e.g. "
                            f"{name}: [4, 8]")
        if all(isinstance(v, dict) for v in values):
            bundles = []
            for i, bundle in enumerate(values):
                label = bundle.get("name")
                knob_values = {}
                for key, value in bundle.items():
                    if key == "name":
                        continue
                    _knob_or_fail(study, key, ("axes", name, i, key))
                    knob_values[key] = _coerce(study, key, value, ("axes", name, i, key))
                if not knob_values and label is None:
                    raise UserError(f"{study.where('axes', name, i)}: a group value sets at least one knob, or "
                                    "has a name (the cell as the rest of the study sets it)")
                bundles.append({"name": str(label) if label is not None else None, "knobs": knob_values})
            out.append({"name": str(name), "kind": "group", "values": bundles})
        elif any(isinstance(v, (dict, list)) for v in values):
            raise UserError(f"{study.where('axes', name)}: values are either all plain values (one knob) or all "
                            "mappings (a group of knobs that move together)")
        else:
            _knob_or_fail(study, str(name), ("axes", name))
            coerced = [_coerce(study, str(name), v, ("axes", name, i)) for i, v in enumerate(values)]
            out.append({"name": str(name), "kind": "knob", "values": coerced})
    return out
