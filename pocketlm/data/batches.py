"""Token shards -> training windows -> batches, as a pure function of (seed, context, position).

A split is read through numpy memory maps, so a corpus larger than memory trains. The token stream of
each shard is cut into non-overlapping windows of `context + 1` tokens (inputs and shifted targets).
Every epoch visits all windows once in an order shuffled by (seed, epoch, context). Window number `g`
of the whole run is window `g % n` of epoch `g // n`: the data position is a single integer, so resuming
(and splitting a global batch across ranks) needs no loader state beyond it.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from pocketlm.data.manifest import load_manifest
from pocketlm.errors import UserError


class TokenSplit:
    """One split (train or val) of a prepared data set, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.dir = Path(data_dir)
        self.manifest = load_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise UserError(f"{data_dir} has no {split!r} split (it has {', '.join(self.manifest['splits'])})")
        info = self.manifest["splits"][split]
        dtype = np.dtype(self.manifest["dtype"])
        self.shards = []
        for shard in info["shards"]:
            path = self.dir / shard["file"]
            if not path.exists():
                raise UserError(f"shard {path} is missing: re-run `pocketlm prepare`")
            if shard["tokens"]:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
        self.split = split
        self.tokens = sum(len(s) for s in self.shards)
        self.bytes = info.get("bytes")

    @property
    def tokenizer_identity(self) -> str:
        return self.manifest["tokenizer"]["identity"]

    def num_windows(self, context: int) -> int:
        return sum((len(s) - 1) // context for s in self.shards)

    def window_counts(self, context: int) -> list[int]:
        return [(len(s) - 1) // context for s in self.shards]


class Batches:
    """Windows of `context` tokens from a split: shuffled epochs for training, sequential for evaluation."""

    def __init__(self, split: TokenSplit, context: int, seed: int, shuffle: bool = True) -> None:
        self.split, self.context, self.seed, self.shuffle = split, context, seed, shuffle
        counts = split.window_counts(context)
        self.n = sum(counts)
        if self.n == 0:
            raise UserError(
                f"the {split.split} split of {split.dir} has {split.tokens} tokens, fewer than one window of "
                f"{context + 1}: lower --context, or prepare more data (or a larger validation fraction)"
            )
        self.starts = np.cumsum([0] + counts).tolist()  # first global window index of each shard
        self._epoch, self._order = -1, None

    def _order_for(self, epoch: int) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(hash((self.seed, epoch, self.context)) & 0x7FFF_FFFF_FFFF_FFFF)
            self._order, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._order

    def _window(self, i: int) -> np.ndarray:
        shard = bisect.bisect_right(self.starts, i) - 1
        offset = (i - self.starts[shard]) * self.context
        return self.split.shards[shard][offset: offset + self.context + 1]

    def get(self, position: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, (count, context) each, for global windows position .. position+count-1."""
        rows = []
        for g in range(position, position + count):
            epoch, i = divmod(g, self.n)
            order = self._order_for(epoch)
            rows.append(self._window(int(order[i]) if order is not None else i))
        block = torch.from_numpy(np.stack(rows).astype(np.int64))
        return block[:, :-1], block[:, 1:]


# -- batch sources: what the Trainer draws micro-batches from (pocketlm.train.Trainer, `batch_source`) ----
class TokenBatchSource:
    """The default batch source: windows of a prepared data set (`pocketlm prepare`).

    A batch is `(inputs, targets)`, each (count, context). `train_batch(context, position, count)` returns
    global windows position .. position+count-1 of the shuffled stream for that context (a pure function
    of seed, context and position: exact resume needs only the position). Validation windows are read in
    order, the same ones at every evaluation.
    """

    def __init__(self, data_dir: str | Path, seed: int) -> None:
        self.train_split, self.val_split = TokenSplit(data_dir, "train"), TokenSplit(data_dir, "val")
        self.seed = seed
        self.description = f"data set {data_dir}"
        self._train: dict[int, Batches] = {}
        self._val: dict[int, Batches] = {}

    @property
    def tokenizer_identity(self) -> str | None:
        """Checked against the model's tokenizer before training (None: nothing to check)."""
        return self.train_split.tokenizer_identity

    def max_context(self) -> int:
        """The longest window the training split can give."""
        return self.train_split.tokens - 1

    def train_batch(self, context: int, position: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if context not in self._train:
            self._train[context] = Batches(self.train_split, context, self.seed)
        return self._train[context].get(position, count)

    def val_batches(self, context: int, n_batches: int, micro_batch: int):
        """The first n_batches * micro_batch validation windows, micro_batch at a time."""
        if context not in self._val:
            self._val[context] = Batches(self.val_split, min(context, self.val_split.tokens - 1), self.seed,
                                         shuffle=False)
        batches = self._val[context]
        windows = min(batches.n, n_batches * micro_batch)
        for start in range(0, windows, micro_batch):
            yield batches.get(start, min(micro_batch, windows - start))


class TensorBatchSource:
    """Batches from token windows already in memory: `train` and `val` are (N, context + 1) int64 tensors.

    Benchmarks and notebooks use it to drive Trainer.step on exactly the batches they chose; window g of
    the run is row g % N, so positions behave as TokenBatchSource's (without shuffling).
    """

    description = "in-memory windows"
    tokenizer_identity = None

    def __init__(self, train: torch.Tensor, val: torch.Tensor | None = None) -> None:
        self.train, self.val = train.reshape(-1, train.shape[-1]), val
        self.context = self.train.shape[1] - 1

    def max_context(self) -> int:
        return self.context

    def train_batch(self, context: int, position: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        if context != self.context:
            raise UserError(f"these in-memory windows hold context {self.context}, not {context}: "
                            f"set the recipe's context to {self.context}")
        rows = self.train[torch.arange(position, position + count) % self.train.shape[0]]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def val_batches(self, context: int, n_batches: int, micro_batch: int):
        if self.val is None:
            return
        windows = self.val.reshape(-1, self.val.shape[-1])[: n_batches * micro_batch]
        for start in range(0, windows.shape[0], micro_batch):
            rows = windows[start: start + micro_batch]
            yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
