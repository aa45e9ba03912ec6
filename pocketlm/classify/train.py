"""Training a classifier through the one training loop: the batch source, the objective and the
validation metric the trainer is given, and the set-up (data, splits, model, saver) before it runs.

- ClassificationBatches: labelled rows -> micro-batches as a pure function of (seed, position), like
  token windows: row number g of the run is row g % N of epoch g // N in an order shuffled by
  (seed, epoch) and then sorted by length within groups of `group` rows (transformers' group_by_length),
  so a micro-batch pads little. The data position is one integer: resume is exact.
- ClassificationObjective: cross-entropy of the head's logits on the labels, per micro-batch.
- AccuracyMetric: validation accuracy (higher is better; the best checkpoint and early stopping follow
  it) and validation loss, over the whole validation set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pocketlm.classify.model import classifier_logits, pad_batch


class ClassificationBatches:
    """Micro-batches of (input_ids, attention_mask, labels), right-padded with pad_id."""

    def __init__(self, ids: list[list[int]], labels: list[int], *, seed: int, pad_id: int, group: int = 256,
                 shuffle: bool = True) -> None:
        if len(ids) != len(labels) or not ids:
            raise ValueError("ids and labels must be non-empty and of equal length")
        self.ids, self.labels, self.seed, self.pad_id = ids, labels, seed, pad_id
        self.group, self.shuffle = max(1, group), shuffle
        self.n = len(ids)
        self._epoch, self._order = -1, None

    def order_for(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
            order = torch.randperm(self.n, generator=g).tolist()
            grouped = []
            for s in range(0, self.n, self.group):  # similar lengths side by side, groups still shuffled
                grouped += sorted(order[s:s + self.group], key=lambda i: -len(self.ids[i]))
            self._order, self._epoch = grouped, epoch
        return self._order

    def rows(self, position: int, count: int) -> list[int]:
        out = []
        for g in range(position, position + count):
            epoch, i = divmod(g, self.n)
            out.append(self.order_for(epoch)[i])
        return out

    def get(self, position: int, count: int) -> dict[str, torch.Tensor]:
        rows = self.rows(position, count)
        ids, mask = pad_batch([self.ids[i] for i in rows], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([self.labels[i] for i in rows], dtype=torch.long)}

    def tokens(self, position: int, count: int) -> int:
        """Real (unpadded) tokens of a micro-batch, for tokens/s."""
        return sum(len(self.ids[i]) for i in self.rows(position, count))


class ClassificationBatchSource:
    """The Trainer's batch source for labelled rows: `train_batch(context, position, count)` is rows
    position .. position+count-1 of the shuffled, length-grouped stream (context is the row cap, which
    the rows already respect); validation runs through AccuracyMetric, not val_batches."""

    def __init__(self, ids: list[list[int]], labels: list[int], *, seed: int, pad_id: int, max_length: int,
                 tokenizer_identity: str | None = None, description: str = "labelled rows") -> None:
        self.batches = ClassificationBatches(ids, labels, seed=seed, pad_id=pad_id)
        self.max_length = max_length
        self.tokenizer_identity = tokenizer_identity
        self.description = description

    def max_context(self) -> int:
        return self.max_length

    def train_batch(self, context: int, position: int, count: int) -> dict[str, torch.Tensor]:
        return self.batches.get(position, count)

    def val_batches(self, context: int, n_batches: int, micro_batch: int):
        return iter(())


class ClassificationObjective:
    """Mean cross-entropy of the classifier's logits against the labels (the loss of one micro-batch)."""

    def setup(self, trainer) -> None:
        if trainer.dist.world_size > 1:  # the head reads the blocks directly, past a DDP/FSDP wrapper
            from pocketlm.errors import UserError

            raise UserError("classification trains in one process: run `pocketlm finetune --task classify` "
                            "without torchrun")

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the GPT inside
        logits = classifier_logits(model, batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"])


@dataclass
class AccuracyMetric:
    """Validation accuracy and loss over every validation row (batched by length, like predict)."""

    ids: list[list[int]]
    labels: list[int]
    pad_id: int
    batch_size: int = 32
    precision: str | None = None
    name: str = "val_accuracy"
    higher_is_better: bool = True

    def evaluate(self, trainer, context: int) -> dict[str, float]:
        return self.scores(trainer.model, precision=trainer.precision)

    def scores(self, model, precision: str | None = None) -> dict[str, float]:
        from pocketlm.classify.predict import predict_logits

        logits = predict_logits(model, self.ids, pad_id=self.pad_id, batch_size=self.batch_size,
                                precision=precision or self.precision)
        labels = torch.tensor(self.labels)
        return {"val_accuracy": float((logits.argmax(-1) == labels).float().mean()),
                "val_loss": float(F.cross_entropy(logits, labels))}
