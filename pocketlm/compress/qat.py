"""Quantization-aware fine-tuning: train float weights through the quantizer they will be saved in.

`prepare_qat(model, options, saver)` changes the class of every layer `pocketlm quantize` would quantize
(the same plan: pocketlm.compress.convert.plan) to a subclass whose forward uses `fake_quantize_ste` of its
weight: the forward sees exactly the weights the quantized folder will hold (the same formats.py arithmetic),
the backward passes the gradient straight through to the float master weight (Bengio et al., 2013; Jacob
et al., 2018). Parameter names do not change, so checkpoints stay ordinary model folders.

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
from pocketlm.names import QAT_FORMATS

QAT_METHODS = ("full",)


@dataclass
class QATOptions:
    format: str = "int4"
    group_size: int = 32
    scheme: str = "sym"
    start_step: int = 0

    def validate(self, method: str = "full") -> None:
        if self.format not in QAT_FORMATS:
            raise UserError(f"--qat {self.format!r}: choose one of {', '.join(QAT_FORMATS)}")
        if method not in QAT_METHODS:
            raise UserError(f"--qat works with --method full, not {method}: quantization-aware training needs "
                            "the weights it quantizes to train (for a LoRA adapter on a fixed low-bit base, "
                            "quantize the base first and fine-tune that folder with --method lora)")
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
    qat_state: QATState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat_state.enabled:
            o = self.qat_state.options
            w = fm.fake_quantize_ste(w, self.qat_format, o.group_size, o.scheme)
        return F.linear(x, w, self.bias)


class FakeQuantEmbedding(nn.Embedding):
    qat_state: QATState

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = fm.fake_quantize_ste(self.weight, "int8") if self.qat_state.enabled else self.weight
        return F.embedding(idx, w)


def _convert(module: nn.Module, cls: type, state: QATState, kind: str) -> None:
    module.__class__ = cls  # same parameters, same names: only forward changes
    module.qat_state = state
    module.qat_format = kind


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
    """Turn on fake quantization in `model` (in place); returns the saver that records it."""
    from pocketlm.compress.convert import plan

    options.validate(method)
    layers = plan(model, options.spec())
    state = QATState(options)
    for name, kind in layers.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            _convert(module, FakeQuantEmbedding, state, "int8")
        else:
            _convert(module, FakeQuantLinear, state, kind)
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
