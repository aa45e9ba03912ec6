"""The Trainer's default objective and validation metric (pocketlm.train.Trainer, `objective`, `metric`).

An objective turns one micro-batch into a scalar loss; a metric turns the validation set into numbers,
one of which picks the best checkpoint and drives early stopping. Other objectives (distillation's KL
term against a teacher, a classification head's cross-entropy) and metrics (accuracy, higher is
better) follow the same two small protocols.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pocketlm.device import autocast


class Objective(Protocol):
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of one micro-batch (already on the device, under autocast). `model` is the module
        to call: during training the DDP/FSDP/compiled wrapper, during evaluation the plain model."""
        ...


class Metric(Protocol):
    name: str  # the key logged in metrics.jsonl that picks the best checkpoint, e.g. "val_loss"
    higher_is_better: bool

    def evaluate(self, trainer, context: int) -> dict[str, float]:
        """Numbers over the validation set, `name` among them (others are logged too)."""
        ...


class LMObjective:
    """Next-token cross-entropy: a batch is (inputs, targets). The whole logits tensor is never held."""

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        inputs, targets = batch
        return model(inputs, targets, return_logits=False)[1]


class ValidationLoss:
    """The objective's mean loss over the batch source's validation batches (lower is better)."""

    name = "val_loss"
    higher_is_better = False

    @torch.no_grad()
    def evaluate(self, trainer, context: int) -> dict[str, float]:
        model = trainer.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for batch in trainer.batch_source.val_batches(context, trainer.cfg.eval_batches, trainer.cfg.micro_batch):
                batch = to_device(batch, trainer.device)
                with autocast(trainer.device, trainer.precision):
                    loss = trainer.objective.loss(model, batch)
                n = batch_size(batch)
                total += loss.item() * n
                count += n
        finally:
            model.train(was_training)
        return {self.name: total / count if count else float("nan")}


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensor, or tuple/list/dict of them) moved to the device; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_size(batch: Any) -> int:
    """Rows in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 1
