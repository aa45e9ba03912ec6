"""The knobs a study can turn: every training flag, the adapter settings, and the post-training steps.

A knob is a name with a type and a check. The check runs on each cell's merged settings before anything
trains, so a value the training command would refuse (a negative rank, an unknown precision) is a one-line
error naming the study file's key and line, not a failed cell an hour later.

Post-training knobs (quantization format, QAT) are registered by the compression code when it is present
(`register_post_training`); until then naming one is refused with a message saying why.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.names import ADAPTER_METHODS, PRECISIONS, TRAIN_METHODS
from pocketlm.names import METHODS as FINETUNE_METHODS
from pocketlm.recipe import TrainConfig

METHODS = (*TRAIN_METHODS, "none")  # none: no training, the base itself (then post-trained)
TRAINED = TRAIN_METHODS
# Run-directory plumbing the engine owns: not knobs.
_NOT_KNOBS = {"out", "resume", "data", "model", "adapter"}  # adapter: the rank/alpha/... knobs below


@dataclass(frozen=True)
class Knob:
    name: str
    kind: str  # int | float | bool | str | list
    help: str
    optional: bool = False  # None allowed
    applies: tuple[str, ...] = TRAINED  # methods this knob changes anything for


def _train_knobs() -> dict[str, Knob]:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        if f.name in _NOT_KNOBS:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kind = {int: "int", float: "float", bool: "bool", str: "str", list: "list"}.get(base, "str")
        out[f.name] = Knob(f.name, kind, f"training setting `{f.name}`", optional)
    return out


KNOBS: dict[str, Knob] = {
    **_train_knobs(),
    "base": Knob("base", "str", "the model a fine-tune starts from: a built-in base, a folder, a run, "
                 "a .gguf file, or `cell:NAME` for another cell of the study",
                 applies=(*FINETUNE_METHODS, "none")),
    "arch": Knob("arch", "str", "named model config trained from scratch (pocketlm models)", applies=("pretrain",)),
    "tokenizer": Knob("tokenizer", "str", "tokenizer of a from-scratch model's data", applies=("pretrain",)),
    "rank": Knob("rank", "int", "LoRA rank", applies=ADAPTER_METHODS),
    "alpha": Knob("alpha", "float", "LoRA alpha (scale = alpha / rank)", applies=ADAPTER_METHODS),
    "lora_dropout": Knob("lora_dropout", "float", "LoRA dropout", applies=ADAPTER_METHODS),
    "targets": Knob("targets", "str", "LoRA targets: attn, attn+mlp, all-linear or module names",
                    applies=ADAPTER_METHODS),
    "lr_search": Knob("lr_search", "list", "learning rates tried in short runs first", optional=True,
                      applies=FINETUNE_METHODS),
    "qat": Knob("qat", "str", "quantization-aware fine-tuning in this format (int8, int4, fp8; finetune --qat)",
                optional=True, applies=("full",)),
    "corpus": Knob("corpus", "str", "train this cell on another corpus (a path, or `shakespeare`); measures "
                   "still use the study's data", optional=True),
    "preempt_at": Knob("preempt_at", "int", "kill training with SIGKILL once step N is checkpointed, then "
                       "resume (a preemption, as seed 000's)", optional=True),
    "lr_search_steps": Knob("lr_search_steps", "int", "steps of each learning-rate search run",
                            applies=FINETUNE_METHODS),
}

DEFAULTS = {"base": "smollm2-135m", "arch": "gpt2-tiny", "tokenizer": "gpt2", "rank": 8,
            "alpha": 16.0, "lora_dropout": 0.0, "targets": "attn", "lr_search": None, "lr_search_steps": 20, "preempt_at": None,
            "corpus": None, "qat": None}

# name -> (Knob, check(value) raising UserError, apply(cell_run_dir, knobs, log) -> extra row fields)
POST_TRAINING: dict[str, tuple[Knob, Callable, Callable]] = {}
# Knobs the issue names that arrive with other parts of pocketlm; refused with this reason until registered.
# Knobs the issue names that arrive with other parts of pocketlm; refused with this reason until registered.
PENDING: dict[str, str] = {}


def register_post_training(knob: Knob, check: Callable, apply: Callable) -> None:
    """Add a post-training knob (e.g. a quantization format): `check(value)` validates, `apply` runs after
    training on the cell's run directory and returns extra measures (e.g. size_bytes of the result)."""
    POST_TRAINING[knob.name] = (knob, check, apply)
    PENDING.pop(knob.name, None)


def _load_plugins() -> None:
    """Post-training knobs from modules that provide them (the compression code, once it lands)."""
    import importlib

    try:
        module = importlib.import_module("pocketlm.study.compression")
    except ModuleNotFoundError:
        return
    module.register()


def post_training() -> dict:
    """The post-training knobs, plugins loaded."""
    if not POST_TRAINING:
        _load_plugins()
    return POST_TRAINING


def knob(name: str) -> Knob:
    post_training()
    if name == "method":
        return Knob("method", "str", "pretrain, full, lora, qlora, or none (the base as it is)", applies=METHODS)
    if name in KNOBS:
        return KNOBS[name]
    if name in POST_TRAINING:
        return POST_TRAINING[name][0]
    if name in PENDING:
        raise UserError(f"knob {name!r} is not available: {PENDING[name]}")
    raise UserError(f"unknown knob {name!r}: use a training setting, base, arch, rank, alpha, targets, "
                    f"lr_search ... (`pocketlm study list --knobs` lists them)")


def coerce(name: str, value):
    """The value as the knob's type (YAML reads 1e-4 as text; a rate must still be a number)."""
    k = knob(name)
    if value is None:
        if k.optional or k.name in POST_TRAINING:
            return None
        raise UserError(f"{name} needs a value")
    try:
        if k.kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if k.kind == "float":
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if k.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if k.kind == "list":
            if name == "lr_search":
                items = value if isinstance(value, list) else str(value).split(",")
                return [float(x) for x in items]
            if not isinstance(value, list):
                raise ValueError
            return value
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be {_article(k.kind)}, got {value!r}") from exc


def _article(kind: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "list": "a list",
            "str": "text"}[kind]


def check_cell(knobs: dict) -> None:
    """Refuse settings the training commands would refuse (raises UserError naming the knob)."""
    method = knobs["method"]
    if method not in METHODS:
        raise UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if knobs.get("precision", "auto") not in PRECISIONS:
        raise UserError(f"precision {knobs['precision']!r} is not one of {', '.join(PRECISIONS)}")
    if method != "none":  # a `none` cell trains nothing: its training settings do not matter
        to_train_config(knobs, data="<study data>", out="<cell>").validate()
    if method in ADAPTER_METHODS:
        from pocketlm.lora import _check_hparams

        _check_hparams(method, knobs["rank"], knobs["alpha"], knobs["lora_dropout"])
        if not str(knobs["targets"]).strip():
            raise UserError("targets must name layers: attn, attn+mlp, all-linear or module names")
    if method == "pretrain":
        from pocketlm.model import CONFIGS

        if knobs["arch"] not in CONFIGS:
            raise UserError(f"arch {knobs['arch']!r} is not a named model config: choose one of "
                            f"{', '.join(sorted(CONFIGS))}")
    else:
        _check_base(str(knobs["base"]))
    if knobs.get("lr_search"):
        from pocketlm.finetune import parse_lr_list

        parse_lr_list(knobs["lr_search"])
        if knobs["lr_search_steps"] <= 0:
            raise UserError(f"lr_search_steps must be positive, got {knobs['lr_search_steps']}")
    if knobs.get("qat") and method in ("full", "lora"):
        from pocketlm.compress.qat import QATOptions

        QATOptions(format=knobs["qat"]).validate(method, knobs.get("lora_dropout") or 0.0)
    for name, (_, check, _) in post_training().items():
        if knobs.get(name) is not None:
            check(knobs[name])


def _check_base(base: str) -> None:
    from pathlib import Path

    from pocketlm.io.builtins import BUILTIN_BASES

    if base.startswith("cell:") or base in BUILTIN_BASES or Path(base).expanduser().exists():
        return
    if "/" in base and not base.startswith((".", "/", "~")):  # a Hub id: looked up in the cache at run time
        return
    raise UserError(f"base {base!r} is neither a built-in base ({', '.join(BUILTIN_BASES)}), an existing "
                    "folder or file, nor `cell:NAME`")


def relevant(knobs: dict) -> dict:
    """Only the knobs that change anything for the cell's method (a full fine-tune has no rank)."""
    method = knobs["method"]
    return {k: v for k, v in knobs.items() if k == "method" or k not in KNOBS or method in KNOBS[k].applies}


def to_train_config(knobs: dict, *, data: str, out: str, resume: bool = False) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in knobs.items() if k in names and k not in _NOT_KNOBS}
    model = knobs["arch"] if knobs["method"] == "pretrain" else knobs["base"]
    cfg = TrainConfig(**values, model=str(model), data=data, out=out, resume=resume)
    if knobs["method"] in ADAPTER_METHODS:
        from pocketlm.recipe import AdapterConfig

        cfg.adapter = AdapterConfig(rank=knobs["rank"], alpha=knobs["alpha"], dropout=knobs["lora_dropout"],
                                    targets=knobs["targets"])
    return cfg


def expand_path(value: str, here: Path) -> str:
    """Environment variables expanded; a relative path is relative to the study file."""
    text = os.path.expandvars(str(value))
    if "$" in text:
        var = text[text.index("$"):].split("/")[0]
        raise UserError(f"{var} is not set: export it (e.g. POCKETLM_SHARED_DATA=/path/to/shared/data) or pass "
                        "--data PATH")
    p = Path(text).expanduser()
    if text == "shakespeare":
        return text
    return str(p if p.is_absolute() else (here / p))


def resolve_base(knobs: dict, study_dir: Path) -> str:
    """A cell's base: `cell:NAME` is another cell's run directory in the study folder."""
    base = str(knobs["base"])
    return str(study_dir / base[5:]) if base.startswith("cell:") else base
