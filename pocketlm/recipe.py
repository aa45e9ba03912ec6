"""Training recipes: a TrainConfig dataclass (adapter settings nested), read from YAML, overridden by flags.

A recipe is a YAML file whose keys are TrainConfig's fields; LoRA/QLoRA settings sit under one key,
`adapter: {rank, alpha, targets, dropout}`. Built-in recipes live in pocketlm/recipes/NAME.yaml and are
named without the extension (`--config shakespeare-lora`). The resolved recipe is RUN/config.yaml.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from pocketlm.errors import UserError
from pocketlm.names import ADAPTER_METHODS, FORMS, PRECISIONS, TRAIN_METHODS

RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_BATCH_TOKENS = 8192  # when batch_tokens is unset; rounded to whole micro-batches of the context
CPU_DEFAULT_CONTEXT = 512  # when context is unset on a CPU: a base's 8,192 would take hours a step


@dataclass
class AdapterConfig:
    """LoRA/QLoRA settings (`adapter:` in a recipe; --rank/--alpha/--targets/--lora-dropout)."""

    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank
    targets: str = "attn"  # attn, attn+mlp, all-linear, or comma-separated module names
    dropout: float = 0.0  # as PEFT; > 0 keeps a dropped copy of the input per adapted layer (slow, memory)

    @classmethod
    def from_value(cls, value, where: str = "the recipe") -> AdapterConfig:
        if isinstance(value, AdapterConfig):
            return value
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise UserError(f"`adapter` in {where} must be a mapping, e.g. `adapter: {{rank: 8, targets: attn}}`")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"`adapter` in {where} has unknown keys {unknown}: valid keys are {sorted(known)}")
        kinds = {"rank": (int,), "alpha": (int, float), "targets": (str, list), "dropout": (int, float)}
        for key, val in value.items():
            if isinstance(val, bool) or not isinstance(val, kinds[key]):
                raise UserError(f"`adapter.{key}` in {where} must be {' or '.join(k.__name__ for k in kinds[key])}, "
                                f"got {val!r}: fix its value")
        return cls(**value)


@dataclass
class TrainConfig:
    model: str = "gpt2-tiny"  # a named config (pretrain) or a base (finetune)
    data: str = ""  # a prepared data set (pocketlm prepare)
    out: str = "runs/run"
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16 where the hardware runs it natively)
    compile: bool = False
    compile_blocks: bool = False  # torch.compile each block's training forward only (GPT.compile_blocks)
    activation_checkpointing: bool = False  # recompute each block in backward: far less memory, ~1/3 more compute
    max_memory: str | None = None  # e.g. "2GB": recompute the fewest blocks whose estimated peak fits (pocketlm.recompute)
    max_steps: int = 1000
    batch_tokens: int | None = None  # tokens per optimizer step, all ranks together; None = 8192 (see Trainer)
    micro_batch: int = 8  # sequences per forward pass
    context: int | None = None  # sequence length; None = the model's, capped by the data (and at 512 on a CPU)
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
    eval_num_prompts: int = 4  # prompts of eval_prompts scored at each evaluation
    eval_max_new_tokens: int = 128  # greedy tokens per prompt at each evaluation
    resume: bool = False
    method: str = "pretrain"  # pretrain | full | lora | qlora
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # lora/qlora only
    fsdp: bool = False  # shard parameters with FSDP2 under torchrun
    tensorboard: bool = False  # also write TensorBoard event files to RUN/tensorboard
    wandb_project: str | None = None  # also log to Weights & Biases under this project
    teacher: str | None = None  # distil from this model SOURCE (same tokenizer): pocketlm.distill
    distill_alpha: float = 0.5  # loss = CE + alpha * T^2 * KL(teacher_T || student_T)
    distill_temperature: float = 2.0  # T: softens both distributions before the KL

    def __post_init__(self) -> None:
        self.adapter = AdapterConfig.from_value(self.adapter)

    def validate(self, require_data: bool = True) -> None:
        """UserError on a setting that cannot work; `require_data` False when batches come from elsewhere."""
        check_types(self.to_dict(), "settings")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "dropout"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UserError(f"{name.replace('_', '-')} must be a finite number, got {value}")
        positive = ["max_steps", "micro_batch", "eval_every", "eval_batches", "log_every", "keep_checkpoints"]
        for name in positive + (["batch_tokens"] if self.batch_tokens is not None else []):
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
        if self.compile and self.compile_blocks:
            raise UserError("--compile compiles the whole model and --compile-blocks each block: choose one")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.method not in TRAIN_METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(TRAIN_METHODS)}")
        if self.eval_form is not None and self.eval_form not in FORMS:
            from pocketlm.eval.forms import get_form  # registered forms beyond the built-in ones

            get_form(self.eval_form)
        if self.teacher is not None:
            from pocketlm.distill import DistillSettings

            DistillSettings(self.teacher, self.distill_alpha, self.distill_temperature).validate()
        if require_data and not self.data:
            raise UserError("no training data: pass --data DIR (a folder made by `pocketlm prepare`)")
        self._validate_schedule()

    def _validate_schedule(self) -> None:
        if not self.context_schedule:
            return
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
        """The recipe as RUN/config.yaml records it; `adapter` only for the methods that train one."""
        out = asdict(self)
        if self.method not in ADAPTER_METHODS:
            del out["adapter"]
        return out


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
        if name not in FIELDS or name == "adapter":  # AdapterConfig checks its own
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


ADAPTER_FLAGS = {"rank": "rank", "alpha": "alpha", "targets": "targets", "lora_dropout": "dropout"}


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = RECIPES_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise UserError(f"no recipe {name_or_path!r}: give a YAML file or a built-in recipe ({', '.join(names)})")


def read_recipe_file(name_or_path: str) -> dict:
    """A recipe's settings as a dict, checked for unknown keys (nested `adapter` included)."""
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
    if "adapter" in loaded:
        AdapterConfig.from_value(loaded["adapter"], where=f"recipe {path}")  # fail early, with the file named
    return loaded


def load_recipe(name_or_path: str | None, overrides: dict | None = None) -> TrainConfig:
    """A recipe (name or YAML file, or none), then `overrides` (None values ignored). `overrides["adapter"]`
    may be a partial mapping: its keys replace the recipe's adapter keys one by one."""
    values: dict = read_recipe_file(name_or_path) if name_or_path else {}
    check_types(_numbers_from_strings(values), f"recipe {name_or_path}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    adapter = dict(values.get("adapter") or {})
    given = overrides.pop("adapter", None) or {}
    if isinstance(given, AdapterConfig):
        given = asdict(given)
    adapter.update({k: v for k, v in given.items() if v is not None})
    values.update(overrides)
    values["adapter"] = AdapterConfig.from_value(adapter)
    return TrainConfig(**values)


def field_default(name: str):
    """TrainConfig's default for a field (what a flag means when neither it nor the recipe is given)."""
    f = FIELDS[name]
    return f.default_factory() if callable(f.default_factory) else f.default


# Flags shared by `pretrain` and `finetune`: (field, type, help, what an unset value means, or None to show
# the field's default). Parser defaults stay None so that only flags given override the recipe.
_FLAGS: list[tuple[str, type, str, str | None]] = [
    ("data", str, "prepared data set (pocketlm prepare)", "the recipe's"),
    ("out", str, "run directory", None),
    ("seed", int, "random seed", None),
    ("device", str, "auto, cpu, cuda, cuda:N or mps", None),
    ("precision", str, "fp32, bf16, fp16 or auto (bf16 where the hardware runs it natively)", None),
    ("max_steps", int, "optimizer steps", None),
    ("batch_tokens", int, "tokens per optimizer step (gradient accumulation reaches it)",
     f"{DEFAULT_BATCH_TOKENS}, rounded to whole micro-batches"),
    ("micro_batch", int, "sequences per forward pass", None),
    ("context", int, "sequence length", f"the model's, capped by the data, and at {CPU_DEFAULT_CONTEXT} on a CPU"),
    ("lr", float, "peak learning rate", None),
    ("min_lr_ratio", float, "final learning rate as a fraction of the peak", None),
    ("warmup_steps", int, "linear warm-up steps", None),
    ("weight_decay", float, "AdamW weight decay", None),
    ("grad_clip", float, "gradient-norm clip (0 = off)", None),
    ("dropout", float, "dropout probability", "the model's"),
    ("eval_every", int, "evaluate validation loss every N steps", None),
    ("eval_batches", int, "validation batches per evaluation", None),
    ("save_every", int, "checkpoint every N steps", "eval-every"),
    ("keep_checkpoints", int, "how many recent checkpoints to keep (the best is always kept)", None),
    ("patience", int, "early stopping after N evaluations without improvement (0 = off)", None),
    ("log_every", int, "log training loss every N steps", None),
    ("sample_every", int, "write a sample every N steps (0 = off)", None),
    ("sample_prompt", str, "prompt for samples during training", "a newline"),
    ("sample_tokens", int, "tokens per sample during training", None),
    ("eval_prompts", str, "JSONL of prompt/reference pairs scored during training", "none"),
    ("eval_form", str, f"form check during training: {', '.join(FORMS)}", "none"),
    ("max_memory", str, "memory budget of a training step, e.g. 2GB: recompute the fewest blocks in backward "
     "whose estimated peak fits (ignored with --activation-checkpointing, which recomputes all)", "no budget"),
    ("wandb_project", str, "also log metrics to Weights & Biases under this project (pip install wandb; "
     "WANDB_MODE=offline works without an account)", "off"),
    ("teacher", str, "distil from this model SOURCE (it must share the student's tokenizer): the loss adds "
     "alpha * T^2 * KL(teacher || student) over temperature-softened next-token distributions", "none"),
    ("distill_alpha", float, "weight of the distillation term (0 = plain training)", None),
    ("distill_temperature", float, "temperature T that softens both distributions", None),
]
_SWITCHES: list[tuple[str, str]] = [
    ("compile", "torch.compile the model (for GPUs; slow to compile on a CPU)"),
    ("compile_blocks", "torch.compile each transformer block for training steps only (evaluation and sampling "
     "stay eager): on a CPU 30-50 s once, then up to ~1.15x faster steps on some machines, none on others, "
     "with more memory: measure it on a long run"),
    ("activation_checkpointing", "keep only each block's input and recompute the block in backward: much less "
     "memory for about a third more compute"),
    ("fsdp", "shard parameters with FSDP2 (under torchrun)"),
    ("tensorboard", "also write TensorBoard event files to RUN/tensorboard (pip install tensorboard)"),
    ("resume", "continue the run in --out from its latest checkpoint"),
]


def _help(text: str, name: str, unset: str | None) -> str:
    shown = unset if unset is not None else field_default(name)
    return f"{text} (default: {shown}; a --config recipe's value wins)".replace("%", "%%")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML recipe, or a built-in recipe name "
                        f"({', '.join(sorted(p.stem for p in RECIPES_DIR.glob('*.yaml')))})")
    for name, kind, text, unset in _FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                            help=_help(text, name, unset))
    for name, text in _SWITCHES:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=text)


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """--rank/--alpha/--targets/--lora-dropout: the recipe's `adapter:` settings, one flag each."""
    d = AdapterConfig()
    group = parser.add_argument_group("LoRA / QLoRA (a recipe's `adapter:` settings)")
    group.add_argument("--rank", type=int, default=None, help=f"adapter rank (default: {d.rank})")
    group.add_argument("--alpha", type=float, default=None,
                       help=f"adapter scaling numerator, scale = alpha/rank (default: {d.alpha:g})")
    group.add_argument("--targets", default=None, help="layers to adapt: attn, attn+mlp, all-linear, or "
                       f"comma-separated module names (default: {d.targets})")
    group.add_argument("--lora-dropout", type=float, default=None,
                       help=f"dropout on the adapter input (default: {d.dropout:g}, as PEFT; 0.05 measured about "
                       "2x slower with +1.7 GB on smollm2-135m at 8x256: every adapted layer then keeps its own "
                       "dropped copy of its input)")


def config_from_args(args: argparse.Namespace, **extra) -> TrainConfig:
    overrides = {name: getattr(args, name, None) for name in FIELDS if name != "adapter"}
    overrides["adapter"] = {key: getattr(args, flag, None) for flag, key in ADAPTER_FLAGS.items()}
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return load_recipe(getattr(args, "config", None), overrides)
