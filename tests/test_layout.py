"""One home for each thing the code once wrote twice, names in the docs that resolve, and ARCHITECTURE.md
naming every module (cheap static checks: nothing here loads a model)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pocketlm"
HOME = "pocketlm/device.py"


def _sources() -> dict[str, str]:
    return {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def _functions(text: str) -> list[str]:
    return [n.name for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_a_data_sets_manifest_has_one_reader():
    readers = [f"{path}:{name}" for path, text in _sources().items() for name in _functions(text)
               if re.fullmatch(r"_?(read|load|parse|open)_manifest", name)]
    assert readers == ["pocketlm/data/manifest.py:load_manifest"]


@pytest.mark.parametrize("pattern,home,what", [
    (r"\.to_empty\(", "pocketlm/model.py", "the meta-device build with re-tied weights (GPT.empty)"),
    (r"parameters\(\)\)\.device", HOME, "a model's device (pocketlm.device.model_device)"),
    (r"get_autocast_dtype|is_autocast_enabled", HOME, "the autocast dtype (pocketlm.device.autocast_dtype)"),
    (r"[\"']bf16[\"']\s*:\s*torch\.bfloat16", HOME, "the precision -> dtype table (device.PRECISION_DTYPES)"),
])
def test_each_lookup_and_build_has_one_home(pattern, home, what):
    found = [path for path, text in _sources().items() if re.search(pattern, text)]
    assert found == [home], f"{what} is written outside {home}: {found}"


def test_model_device_is_defined_once():
    defined = [f"{path}:{name}" for path, text in _sources().items() for name in _functions(text)
               if name in ("_model_device", "model_device")]
    assert defined == [f"{HOME}:model_device"]


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_dotted_names_in_docs_and_docstrings_exist():
    """`pocketlm.x.y` in the code's text and the docs names something real (a docstring once cited
    `hf.resolve_model_source`, which did not exist). Quoted strings in code are values (format names such
    as 'pocketlm.tokens.v1'), and `.vN` / `.json` endings are formats and file names, not references."""
    texts = dict(_sources())
    texts |= {p.relative_to(REPO).as_posix(): p.read_text()
              for p in [REPO / "README.md", REPO / "ARCHITECTURE.md", *sorted((REPO / "docs").glob("*.md")),
                        *sorted((REPO / "benchmarks").glob("*.py"))]}
    missing = set()
    for path, text in texts.items():
        for m in re.finditer(r"\bpocketlm(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text):
            name = m.group(0)
            if re.search(r"\.(v\d+|vN|json)$", name) or (path.endswith(".py") and text[m.start() - 1] in "'\""):
                continue
            if not _resolves(name):
                missing.add(f"{path}: {name}")
    assert sorted(missing) == []


def test_recipes_named_in_the_code_and_docs_exist():
    """recipe.py's docstring once named a recipe `shakespeare-tiny` that did not exist."""
    recipes = {p.stem for p in (PACKAGE / "recipes").glob("*.yaml")}
    texts = [*(_sources().values()), (REPO / "README.md").read_text(), (REPO / "ARCHITECTURE.md").read_text()]
    named = {m for text in texts for m in re.findall(r"--config[ =]([a-z0-9]+-[a-z0-9-]+)", text)}
    assert named and named <= recipes


def test_architecture_names_every_module():
    text = (REPO / "ARCHITECTURE.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `pocketlm/")]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(REPO).as_posix()
        folder = path.parent.relative_to(REPO).as_posix()
        top = "/".join(rel.split("/")[:2]) + "/"  # pocketlm/eval/forms/sonnet.py is listed in the eval/ row
        in_row = any(row.startswith((f"| `{folder}/`", f"| `{top}`")) and re.search(rf"`{path.stem}(\.py)?`", row)
                     for row in rows)
        if f"`{rel}`" not in text and not in_row:
            missing.append(rel)
    assert missing == []


@pytest.mark.parametrize("bench", ["bench_train.py", "bench_lora.py", "bench_finetune.py"])
def test_training_benchmarks_drive_the_trainer_users_run(bench):
    """bench_lora once rebuilt a training step by hand, so it did not measure the code users run."""
    tree = ast.parse((REPO / "benchmarks" / bench).read_text())
    from_train = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "pocketlm.train"
                  for a in n.names}
    assert from_train & {"Trainer", "trainer_on_windows"}, f"{bench} does not build pocketlm.train's Trainer"
    steps = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "step" and isinstance(n.func.value, ast.Name) and "trainer" in n.func.value.id]
    assert steps, f"{bench} never calls trainer.step()"


def test_during_training_reads_only_fields_the_recipe_has():
    """during_training.py once read fields TrainConfig did not have, through getattr."""
    from dataclasses import fields

    from pocketlm.recipe import TrainConfig

    tree = ast.parse((PACKAGE / "eval" / "during_training.py").read_text())
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", "") == "cfg"}
    dynamic = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "getattr"]
    assert read and read <= {f.name for f in fields(TrainConfig)} and dynamic == []


def test_shared_names_are_spelled_only_in_names_py():
    """Method, precision and format lists once lived in three places kept in sync by hand."""
    from pocketlm import names

    shared = {tuple(v): k for k, v in vars(names).items() if k.isupper() and isinstance(v, tuple) and len(v) > 1}
    copies = []
    for path, text in _sources().items():
        if path == "pocketlm/names.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                value = tuple(e.value for e in node.elts)
                if value in shared:
                    copies.append(f"{path}:{node.lineno} {shared[value]}")
    assert copies == []
