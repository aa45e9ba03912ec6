"""Imports flow one way: pocketlm's import graph has no cycle (imports inside functions count too), and
no function in pocketlm/ runs over 80 lines unless a comment in its signature says why."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pocketlm"
MAX_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _lazy_exports(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Packages whose __init__ exports names lazily (an `_EXPORTS = {name: submodule}` table)."""
    out = {}
    for name, path in modules.items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
                out[name] = {k: v if v.startswith("pocketlm.") else f"{name}.{v}"
                             for k, v in ast.literal_eval(node.value).items()}
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the pocketlm modules it imports anywhere in its file. Importing a.b.c also runs the
    __init__ of every package above it (except the importer's own), so those count as edges too."""
    modules = _modules()
    lazy = _lazy_exports(modules)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def ancestors(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts))}

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{base}" if base else up
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(lazy.get(base, {}).get(alias.name) or (full if full in modules else base))
        edges = set()
        for target in targets:
            resolved = known(target) if target.startswith("pocketlm") else None
            if resolved:
                edges |= {resolved} | (ancestors(resolved) - ancestors(module) - {package})
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_pocketlm_imports_have_no_cycle():
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "pocketlm.io.sources" in graph["pocketlm.tokenizer"]  # a function-level import is an edge
    assert "pocketlm.io.sources" in graph["pocketlm.finetune"]  # `from pocketlm.io import load_model`


def test_every_pocketlm_import_names_a_module_here():
    """An import of a removed module must fail here, not fall back to another checkout's copy."""
    modules = _modules()
    missing = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            missing += [f"{module}: {n}" for n in names if n.startswith("pocketlm") and n not in modules]
    assert missing == []


def test_no_function_over_80_lines_without_a_reason():
    long = []
    for path in ROOT.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                signature = lines[node.lineno - 1: node.body[0].lineno - 1]
                if length > MAX_LINES and not any("#" in line for line in signature):
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []
