"""Reading a prepared data set's manifest.json, checked down to every shard's size.

Every reader (training, evaluation, `pocketlm eval --data`) goes through `load_manifest`, so a truncated,
hand-edited, newer or foreign manifest and a truncated shard all end in one line saying what to do.
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.versions import check_format

FORMAT = "pocketlm.tokens.v1"
SPLITS = ("train", "val")
ITEMSIZE = {"uint16": 2, "uint32": 4}


def _bad(path: Path, what: str, directory: Path) -> UserError:
    return UserError(f"{path} is invalid ({what}): run `pocketlm prepare SOURCE --out {directory}` again")


def _check_split(path: Path, directory: Path, split: str, info, itemsize: int) -> None:
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        raise _bad(path, f"split {split!r} has no list of shards", directory)
    for shard in info["shards"]:
        name = shard.get("file") if isinstance(shard, dict) else None
        tokens = shard.get("tokens") if isinstance(shard, dict) else None
        if not isinstance(name, str) or Path(name).name != name or not name:
            raise _bad(path, f"a {split} shard has no plain file name", directory)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise _bad(path, f"{split} shard {name} has no token count", directory)
        file = directory / name
        size = file.stat().st_size if file.is_file() else None
        if size != tokens * itemsize:
            state = "missing" if size is None else f"{size} bytes, expected {tokens * itemsize}"
            raise UserError(f"{split} shard {file} is {state} (truncated or replaced): run `pocketlm prepare "
                            f"SOURCE --out {directory}` again")


def load_manifest(directory: str | Path) -> dict:
    """DIR/manifest.json, checked: format and version, fields and their types, every shard's size."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise UserError(f"{directory} is not a prepared data set (no manifest.json): run `pocketlm prepare "
                        f"SOURCE --out {directory}` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(path, f"not complete JSON: {str(exc).splitlines()[0][:80]}", directory) from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict):
        raise _bad(path, f"a JSON {type(manifest).__name__}, not an object", directory)
    check_format(manifest.get("format"), FORMAT, path, "a prepared data set",
                 f"run `pocketlm prepare SOURCE --out {directory}` again")
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("identity"), str):
        raise _bad(path, "no tokenizer identity", directory)
    if manifest.get("dtype") not in ITEMSIZE:
        raise _bad(path, f"dtype {manifest.get('dtype')!r} is not uint16 or uint32", directory)
    if not isinstance(manifest.get("eot_id"), int):
        raise _bad(path, "no eot_id", directory)
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        raise _bad(path, "splits must be exactly train and val", directory)
    for split, info in splits.items():
        _check_split(path, directory, split, info, ITEMSIZE[manifest["dtype"]])
    return manifest
