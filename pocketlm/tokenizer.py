"""Tokenizers in one import: the Tokenizer type (pocketlm.io.tokenizers) and `load_tokenizer`, which reads
one from any source: a built-in name (`gpt2`, `smollm2`), a folder with tokenizer files, a tokenizer.json,
a model folder, a run directory, a .gguf file or a cached Hub id (pocketlm.io.sources).

A tokenizer's identity is a hash of its content (vocabulary, merges, special tokens), never its name or
path. Data sets and checkpoints store it, and pocketlm refuses to train or evaluate a model on data made
with another tokenizer (check_same_tokenizer).
"""

from __future__ import annotations

from pathlib import Path

from pocketlm.io.tokenizers import (
    GPT2_EOT,
    Tokenizer,
    builtin_gpt2,
    check_same_tokenizer,
    from_hf_folder,
    from_json_file,
    gpt2_from_files,
    package_dir,
    read_json_file,
    read_tokenizer_json,
)

__all__ = ["GPT2_EOT", "Tokenizer", "builtin_gpt2", "check_same_tokenizer", "from_hf_folder", "from_json_file",
           "gpt2_from_files", "load_tokenizer", "package_dir", "read_json_file", "read_tokenizer_json"]


def load_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of any source (pocketlm.io.sources.load_tokenizer). Imported on first call: reading
    tokenizers stays light (no torch) for commands that only tokenize, such as `pocketlm prepare`."""
    from pocketlm.io.sources import load_tokenizer as load

    return load(source)
