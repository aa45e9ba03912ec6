"""File-format versions: every file pocketlm writes for others to read names its format, `pocketlm.KIND.vN`.

A reader meeting a newer (or otherwise unknown) version refuses in one line instead of misreading it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pocketlm.errors import UserError

_FORMAT = re.compile(r"^(pocketlm\.[a-z_.]+)\.v(\d+)$")


def parse_format(value) -> tuple[str, int] | None:
    """'pocketlm.tokens.v1' -> ('pocketlm.tokens', 1); None for anything else."""
    m = _FORMAT.match(value) if isinstance(value, str) else None
    return (m.group(1), int(m.group(2))) if m else None


def check_format(found, expected: str, path: str | Path, what: str, fix: str) -> None:
    """Refuse `found` unless it is `expected` (or an older version of it that the reader still lists)."""
    if found == expected:
        return
    want = parse_format(expected)
    got = parse_format(found)
    assert want is not None, expected
    if got is None or got[0] != want[0]:
        raise UserError(f"{path} is not {what} (format {found!r}, expected {expected!r}): {fix}")
    if got[1] > want[1]:
        raise UserError(f"{path} was written by a newer pocketlm (format {found}; this version reads "
                        f"{expected}): upgrade pocketlm (pip install -U pocketlm), or {fix}")
    raise UserError(f"{path} has an unknown format version {found!r} (this version reads {expected}): {fix}")
