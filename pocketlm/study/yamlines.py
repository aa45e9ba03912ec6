"""YAML with line numbers: every value of a study file can be traced back to its line for error messages.

`load(text)` returns (data, lines) where `lines[path]` is the 1-based line of the value at `path`, a tuple
of keys and list indices such as ("axes", "rank", 2). PyYAML's composer keeps marks on every node; the
constructor drops them, so the tree is walked once here.
"""

from __future__ import annotations

import yaml

from pocketlm.errors import UserError

Path_ = tuple


def load(text: str, name: str) -> tuple[object, dict[Path_, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name} line {mark.line + 1}" if mark is not None else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem}): fix the syntax") from exc
    if node is None:
        return None, {}
    lines: dict[Path_, int] = {}
    _walk(node, (), lines)
    data = yaml.safe_load(text)
    return data, lines


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node)) if not isinstance(key_node, yaml.ScalarNode) \
                else _scalar(key_node)
            _walk(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1  # the key's line reads best in errors
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), lines)


def _scalar(node: yaml.ScalarNode):
    return yaml.safe_load(yaml.serialize(node))


def line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    """The line of `path`, or of its nearest ancestor that has one."""
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
