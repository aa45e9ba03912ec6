"""Training recipes: one flat dataclass, read from YAML and overridden by command-line flags.

A recipe is a YAML file whose keys are TrainConfig's fields. Built-in recipes live in
pocketlm/recipes/NAME.yaml and are named without the extension (`--config shakespeare-tiny`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from pocketlm.errors import UserError

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class TrainConfig:
    model: str = "gpt2-tiny"  # a named config (pretrain) or a base (finetune)
    data: str = ""  # a prepared data set (pocketlm prepare)
    out: str = "runs/run"
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 where the hardware runs it natively)
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block in backward: far less memory, ~1/3 more compute
    max_steps: int = 1000
    batch_tokens: int = 8192  # tokens per optimizer step, all ranks together; reached by accumulation
    micro_batch: int = 8  # sequences per forward pass
    context: int | None = None  # sequence length; None = the model's context, capped by the data
    context_schedule: list | None = None  # [[step, context], ...], e.g. [[0, 128], [200, 512]]
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float | None = None  # None keeps the model's
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int | None = None  # None = eval_every
    keep_checkpoints: int = 2
    patience: int = 0  # early stopping after this many evaluations without improvement (0 = off)
    log_every: int = 10
    sample_every: int = 0  # write a sample to RUN/samples.jsonl every N steps (0 = off)
    sample_prompt: str = "\n"
    sample_tokens: int = 64
    eval_prompts: str | None = None  # JSONL of {"prompt", "reference"} scored during training
    eval_form: str | None = None  # sonnet | screenplay | greentext, checked during training
    resume: bool = False
    method: str = "pretrain"  # pretrain | full | lora | qlora
    fsdp: bool = False  # shard parameters with FSDP2 under torchrun

    def validate(self) -> None:
        check_types(self.to_dict(), "settings")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "dropout"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UserError(f"{name.replace('_', '-')} must be a finite number, got {value}")
        positive = ["max_steps", "batch_tokens", "micro_batch", "eval_every", "eval_batches", "log_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min-lr-ratio must be within [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise UserError(f"warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.context is not None and self.context <= 0:
            raise UserError(f"context must be positive, got {self.context}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be within [0, 1), got {self.dropout}")
        if not self.data:
            raise UserError("no training data: pass --data DIR (a folder made by `pocketlm prepare`)")
        if self.context_schedule:
            try:
                steps = [int(s) for s, _ in self.context_schedule]
                [int(c) for _, c in self.context_schedule]
            except (TypeError, ValueError) as exc:
                raise UserError("context_schedule must be a list of [step, context] pairs, e.g. "
                                "[[0, 128], [200, 512]]") from exc
            if steps != sorted(steps) or steps[0] != 0:
                raise UserError("context_schedule must start at step 0 and be sorted by step")

    def context_at(self, step: int, model_context: int) -> int:
        if self.context_schedule:
            current = self.context_schedule[0][1]
            for start, ctx in self.context_schedule:
                if step >= start:
                    current = ctx
            return int(current)
        return int(self.context or model_context)

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = {f.name: f for f in fields(TrainConfig)}
_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list,)}


def _numbers_from_strings(values: dict) -> dict:
    """YAML 1.1 reads `1e-3` (no dot) as a string: such strings become the floats they spell."""
    for name, value in values.items():
        if isinstance(value, str) and name in FIELDS and "float" in str(FIELDS[name].type):
            try:
                values[name] = float(value)
            except ValueError:
                pass  # check_types says what is wrong
    return values


def check_types(values: dict, where: str) -> None:
    """Each value has its field's type (YAML gives strings, numbers, booleans, lists): one line if not."""
    for name, value in values.items():
        if name not in FIELDS:
            continue
        kinds = [k.strip() for k in str(FIELDS[name].type).split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in _KINDS.get(k, ()))
        if isinstance(value, bool) and bool not in allowed:
            allowed = ()  # YAML's `yes` is a bool, which Python would take for the int 1
        if not isinstance(value, allowed):
            wanted = " or ".join(k if k != "None" else "null" for k in kinds)
            raise UserError(f"{where}: {name} must be {wanted}, got {value!r} ({type(value).__name__}): fix its "
                            "value")


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = RECIPES_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise UserError(f"no recipe {name_or_path!r}: give a YAML file or a built-in recipe ({', '.join(names)})")


def load_recipe(name_or_path: str | None, overrides: dict | None = None) -> TrainConfig:
    values: dict = {}
    if name_or_path:
        path = recipe_path(name_or_path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(loaded, dict):
            raise UserError(f"recipe {path} must be a mapping of settings, e.g. `max_steps: 100`")
        unknown = sorted(set(loaded) - set(FIELDS))
        if unknown:
            raise UserError(f"recipe {path} has unknown keys {unknown}: valid keys are {sorted(FIELDS)}")
        check_types(_numbers_from_strings(loaded), f"recipe {path}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**values)


# Flags shared by `pretrain` and `finetune`. Defaults are None so that only flags given override the recipe.
_FLAGS: list[tuple[str, type, str]] = [
    ("data", str, "prepared data set (pocketlm prepare)"),
    ("out", str, "run directory"),
    ("seed", int, "random seed"),
    ("device", str, "auto, cpu, cuda, cuda:N or mps"),
    ("precision", str, "fp32, bf16, fp16 or auto"),
    ("max_steps", int, "optimizer steps"),
    ("batch_tokens", int, "tokens per optimizer step (gradient accumulation reaches it)"),
    ("micro_batch", int, "sequences per forward pass"),
    ("context", int, "sequence length"),
    ("lr", float, "peak learning rate"),
    ("min_lr_ratio", float, "final learning rate as a fraction of the peak"),
    ("warmup_steps", int, "linear warm-up steps"),
    ("weight_decay", float, "AdamW weight decay"),
    ("grad_clip", float, "gradient-norm clip (0 = off)"),
    ("dropout", float, "dropout probability"),
    ("eval_every", int, "evaluate validation loss every N steps"),
    ("eval_batches", int, "validation batches per evaluation"),
    ("save_every", int, "checkpoint every N steps (default: eval-every)"),
    ("keep_checkpoints", int, "how many recent checkpoints to keep (the best is always kept)"),
    ("patience", int, "early stopping after N evaluations without improvement (0 = off)"),
    ("log_every", int, "log training loss every N steps"),
    ("sample_every", int, "write a sample every N steps (0 = off)"),
    ("sample_prompt", str, "prompt for samples during training"),
    ("sample_tokens", int, "tokens per sample during training"),
    ("eval_prompts", str, "JSONL of prompt/reference pairs scored during training"),
    ("eval_form", str, "form check during training: sonnet, screenplay or greentext"),
]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML recipe, or a built-in recipe name")
    for name, kind, help_text in _FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text)
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--activation-checkpointing", dest="activation_checkpointing", action="store_true",
                        default=None, help="keep only each block's input and recompute the block in backward: "
                        "much less memory for about a third more compute")
    parser.add_argument("--fsdp", dest="fsdp", action="store_true", default=None,
                        help="shard parameters with FSDP2 (under torchrun)")
    parser.add_argument("--resume", dest="resume", action="store_true", default=None,
                        help="continue the run in --out from its latest checkpoint")


def config_from_args(args: argparse.Namespace, **extra) -> TrainConfig:
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return load_recipe(getattr(args, "config", None), overrides)
