"""pocketlm: build, adapt, compress, evaluate and compare small GPT-style language models.

Data flow (one module per stage):
    corpus (data/sources.py) -> token shards (data/prepare.py) -> batches (data/batches.py)
    -> model (model.py) -> training (train.py: Trainer; runs in rundir.py) -> models on disk (io/)
    -> samples (generate.py) and metrics (eval/) -> study reports

The library calls behind the commands, importable from here (loaded on first use, so `import pocketlm`
stays light): prepare, pretrain, load_model, load_tokenizer, save_model, export, Trainer,
TrainConfig.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "prepare": "pocketlm.data.prepare", "pretrain": "pocketlm.train",
    "load_model": "pocketlm.io.sources", "load_tokenizer": "pocketlm.io.sources", "save_model": "pocketlm.io.folders",
    "export": "pocketlm.io.export", "Trainer": "pocketlm.train", "TrainConfig": "pocketlm.recipe",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
