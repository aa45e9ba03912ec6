"""Reading JSONL inputs with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from pocketlm.errors import UserError


def jsonl_rows(lines: Iterable[str], path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; invalid JSON is a UserError naming the line."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n} is not valid JSON ({exc.msg}): one JSON object per line") from exc
