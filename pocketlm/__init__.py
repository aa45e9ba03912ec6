"""pocketlm: build, adapt, compress, evaluate and compare small GPT-style language models.

Data flow (one module per stage):
    corpus (data/sources.py) -> token shards (data/prepare.py) -> batches (data/batches.py)
    -> model (model.py) -> training (train.py: Trainer; runs in rundir.py) -> models on disk (io/)
    -> samples (generate.py) and metrics (eval/) -> study reports

The library calls behind the commands, importable from here (loaded on first use, so `import pocketlm`
stays light), each taking the command's flags as arguments: prepare, pretrain, finetune, generate,
evaluate, export, merge, quantize, synthesize, run_study, list_models; and load_model, load_tokenizer,
save_model, Trainer, TrainConfig.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "prepare": "pocketlm.data.prepare", "pretrain": "pocketlm.train", "finetune": "pocketlm.finetune",
    "generate": "pocketlm.generate", "evaluate": "pocketlm.eval.api", "export": "pocketlm.io.export",
    "merge": "pocketlm.io.export", "quantize": "pocketlm.compress.api", "synthesize": "pocketlm.synth",
    "run_study": "pocketlm.study", "list_models": "pocketlm.model",
    "load_model": "pocketlm.io.sources", "load_tokenizer": "pocketlm.io.sources", "save_model": "pocketlm.io.folders",
    "Trainer": "pocketlm.train", "TrainConfig": "pocketlm.recipe",
}

# Modules that are also their command's library call. Importing pocketlm.generate sets the attribute
# `pocketlm.generate` to the module, so no function of that name could live there; calling the module
# calls the function instead, and `pocketlm.generate.SamplingSettings` still names the module's contents.
_CALLS = {"pocketlm.generate": "generate_from_source", "pocketlm.finetune": "finetune"}


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return getattr(self, _CALLS[self.__name__])(*args, **kwargs)


def _make_callable(module_name: str) -> None:
    """Called at the end of each module in _CALLS."""
    sys.modules[module_name].__class__ = _CallableModule


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return module if module.__name__ in _CALLS else getattr(module, name)
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
