"""Quantization-aware fine-tuning: train float weights through the quantizer they will be saved in.

`prepare_qat(model, options, saver)` changes the class of every layer `pocketlm quantize` would quantize
(the same plan: pocketlm.compress.convert.plan) to a subclass whose forward uses `fake_quantize_ste` of its
weight: the forward sees exactly the weights the quantized folder will hold (the same formats.py arithmetic),
the backward passes the gradient straight through to the float master weight (Bengio et al., 2013; Jacob
et al., 2018). Parameter names do not change, so checkpoints stay ordinary model folders.

LoRA (QAFT): the merged weight W + scaling * B A of each adapted layer is what gets fake-quantized (not
the frozen base alone, with a float adapter beside it): `pocketlm quantize RUN` merges the adapter and then
quantizes, so only this makes the quantized folder compute what the training computed. The gradient
reaches B and A through the product (straight through the rounding).

From `start_step` on (0: from the first step) the fake quantization is on. The step is counted by an
optimizer post-step hook and restored from the checkpoint on resume, so a resumed QAT run computes every loss
an uninterrupted one does. Each checkpoint holds `qat.json` (format, group size, scheme, start step), which
`pocketlm quantize RUN` reads to produce the same weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from pocketlm.compress import formats as fm
from pocketlm.errors import UserError
from pocketlm.lora import LoraLinear
from pocketlm.names import QAT_FORMATS

QAT_METHODS = ("full", "lora")


@dataclass
class QATOptions:
    format: str = "int4"
    group_size: int = 32
    scheme: str = "sym"
    start_step: int = 0

    def validate(self, method: str = "full", lora_dropout: float = 0.0) -> None:
        if self.format not in QAT_FORMATS:
            raise UserError(f"--qat {self.format!r}: choose one of {', '.join(QAT_FORMATS)}")
        if method not in QAT_METHODS:
            raise UserError(f"--qat works with --method full or lora, not {method}: QLoRA's NF4 base is a "
                            "quantization of its own (use --method lora --qat int4 for quantization-aware LoRA)")
        if method == "lora" and lora_dropout:
            raise UserError(f"--qat with LoRA fake-quantizes the merged weight W + BA, which the adapter's input "
                            f"dropout ({lora_dropout}) cannot be part of: pass --lora-dropout 0")
        fm.QuantSpec(self.format, self.group_size, self.scheme).validate()
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise UserError(f"--qat-start-step must be a step number >= 0, got {self.start_step!r}")

    def spec(self) -> fm.QuantSpec:
        return fm.QuantSpec(self.format, self.group_size, self.scheme)

    def to_dict(self) -> dict:
        return asdict(self)


class QATState:
    """The optimizer steps taken so far, shared by every fake-quantized layer of one model."""

    def __init__(self, options: QATOptions) -> None:
        self.options = options
        self.step = 0
        self.hook = None

    @property
    def enabled(self) -> bool:
        return self.step >= self.options.start_step


class FakeQuantLinear(nn.Linear):
    qat_format: str
    qat_group: int | None  # the layer's group size (int8 table/head: fm.table_group; blocks: the option's)
    qat_state: QATState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat_state.enabled:
            w = _frozen_quantized(self) if not w.requires_grad else \
                fm.fake_quantize_ste(w, self.qat_format, self.qat_group, self.qat_state.options.scheme)
        return F.linear(x, w, self.bias)


class FakeQuantEmbedding(nn.Embedding):
    qat_group: int | None
    qat_state: QATState

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat_state.enabled:
            w = _frozen_quantized(self) if not w.requires_grad else fm.fake_quantize_ste(w, "int8", self.qat_group)
        return F.embedding(idx, w)


def _frozen_quantized(module: nn.Module) -> torch.Tensor:
    """A frozen weight's fake quantization (LoRA QAT: every layer but the adapters), computed once per
    version of the weight rather than every forward."""
    w = module.weight
    key = (w.data_ptr(), w._version, w.dtype)
    cached = getattr(module, "_qat_cache", None)
    if cached is None or cached[0] != key:
        q = fm.fake_quantize(w, getattr(module, "qat_format", "int8"), module.qat_group,
                             module.qat_state.options.scheme).to(w.dtype)
        cached = module._qat_cache = (key, q)
    return cached[1]


class FakeQuantLoraLinear(LoraLinear):
    """LoRA under QAT (seed 001's QAFT): the forward uses fake_quantize(W + scaling * B A), the weight that
    merging the adapter and quantizing yields, so `pocketlm quantize RUN` holds exactly what the training saw.
    The straight-through gradient of that weight reaches B and A through the product; W stays frozen."""

    qat_format: str
    qat_group: int | None
    qat_state: QATState

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if not self.qat_state.enabled:
            return LoraLinear.forward(self, x, gate)
        if gate is not None:
            x = F.silu(gate) * x
        base = self.base_layer
        # The same arithmetic as LoraLinear.merged (weight + (B @ A) * scaling, in float32): bit for bit the
        # merged weight `pocketlm quantize` quantizes.
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        w = fm.fake_quantize_ste(base.weight.detach().float() + delta, self.qat_format, self.qat_group,
                                 self.qat_state.options.scheme)
        return F.linear(x, w.to(base.weight.dtype), base.bias)


def _convert(module: nn.Module, cls: type, state: QATState, kind: str, group: int | None) -> None:
    module.__class__ = cls  # same parameters, same names: only forward changes
    module.qat_state = state
    module.qat_format = kind
    module.qat_group = group


class QATSaver:
    """Wraps a run's weight saver: checkpoints also hold qat.json; resuming restores the step count."""

    def __init__(self, inner, state: QATState) -> None:
        self.inner, self.state = inner, state

    def save(self, model, tokenizer, directory: Path) -> None:
        self.inner.save(model, tokenizer, directory)
        (directory / "qat.json").write_text(json.dumps(self.state.options.to_dict(), indent=2) + "\n")

    def load(self, model, directory: Path) -> None:
        recorded = directory / "qat.json"
        if not recorded.is_file():
            raise UserError(f"{directory} was trained without --qat: resume it without --qat, or start a new run")
        if json.loads(recorded.read_text()) != self.state.options.to_dict():
            raise UserError(f"{directory} was trained with QAT settings {recorded.read_text().strip()}: resume "
                            "with the same --qat, --qat-group-size, --qat-scheme and --qat-start-step")
        self.inner.load(model, directory)
        from pocketlm.rundir import step_state

        self.state.step = int(step_state(directory)["step"])


def prepare_qat(model: nn.Module, options: QATOptions, saver, method: str = "full") -> QATSaver:
    """Turn on fake quantization in `model` (in place); returns the saver that records it.

    Full fine-tuning: every layer `pocketlm quantize` would quantize trains through its fake quantization.
    LoRA: each adapted layer fake-quantizes its merged weight (FakeQuantLoraLinear), every other layer its
    frozen weight; the adapters are the only trainable weights.
    """
    from pocketlm.compress.convert import plan
    from pocketlm.lora import lora_modules

    options.validate(method)
    adapted = lora_modules(model)
    if method != "full" and any(type(m.base_layer) is not nn.Linear for m in adapted.values()):
        raise UserError("--qat with --method lora needs a float base: give the original model as --base (the "
                        "run's merged weights are quantized with --qat's format afterwards)")
    layers = plan(model, options.spec())
    state = QATState(options)
    for name, module in adapted.items():
        _convert(module, FakeQuantLoraLinear, state, options.format, options.group_size)
        layers.pop(f"{name}.base_layer", None)
    for name, kind in layers.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            _convert(module, FakeQuantEmbedding, state, "int8", fm.table_group(module.embedding_dim))
        elif name == "lm_head":
            _convert(module, FakeQuantLinear, state, kind, fm.table_group(module.in_features))
        else:
            _convert(module, FakeQuantLinear, state, kind, options.group_size)
    params = {id(p) for p in model.parameters()}

    def count_step(optimizer, args, kwargs) -> None:
        if any(id(p) in params for group in optimizer.param_groups for p in group["params"]):
            state.step += 1

    state.hook = register_optimizer_step_post_hook(count_step)  # every optimizer; count_step filters
    return QATSaver(saver, state)


def finish_qat(saver) -> None:
    """Remove the step-counting hook of a QAT run (after training)."""
    if isinstance(saver, QATSaver) and saver.state.hook is not None:
        saver.state.hook.remove()
        saver.state.hook = None
