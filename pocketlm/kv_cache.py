"""The KV caches of decoding: keys and values kept between steps so each new token attends to the prefix
without recomputing it. `KVCache` serves one batch that advances together (generate); `BatchKVCache`
holds independent sequences of different lengths (the server's batch)."""

from __future__ import annotations

from typing import Protocol

import torch


class CacheShape(Protocol):
    """What a cache needs of a model's config (pocketlm.model.ModelConfig)."""

    n_layer: int
    kv_heads: int
    head_dim: int


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Generation feeds the prompt once, then one token at a time; each step reads the cache instead of
    recomputing attention over the whole prefix.
    """

    def __init__(self, config: CacheShape, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0  # positions filled so far

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.pos, self.pos + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. samples that have not stopped)."""
        self.k = [t[index] for t in self.k]
        self.v = [t[index] for t in self.v]


class StaticKVCache:
    """A `KVCache` seen with fixed shapes, for a compiled decode step (pocketlm.generate, `compile=True`).

    The position is a tensor and every step writes at it and attends over all `max_len` positions under a
    mask, so one graph compiled for (batch, 1 token) serves every step: no shape or Python number changes
    between steps, hence no recompilation. It shares the storage of the KVCache the prompt was prefilled into.
    """

    def __init__(self, cache: KVCache) -> None:
        self.k, self.v, self.max_len = cache.k, cache.v, cache.max_len
        device = cache.k[0].device
        self.pos = torch.tensor([cache.pos], device=device)  # (1,): the position the next token takes
        self._positions = torch.arange(cache.max_len, device=device)

    def mask(self) -> torch.Tensor:
        """(1, max_len): the positions the next token sees (those filled, and its own)."""
        return (self._positions <= self.pos)[None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer]


class BatchKVCache:
    """Keys and values of independent sequences of different lengths: the rows of a serving batch.

    Row r holds its sequence at positions [0, lengths[r]). A step feeds T new tokens to every row; each
    row's tokens go to its own positions (position embedding or RoPE there), and attention masks every
    position past the row's end, so rows of different lengths decode together in one forward pass.
    Rows are kept compact (0..rows-1): `append` adds a sequence prefilled in a single-row `KVCache` (or
    in a row of another BatchKVCache), `remove` moves the last row into the freed one. Storage grows on
    demand and is freed when the last row leaves, so an idle server holds no cache.

    Ragged steps (prompts of different lengths prefilled together): `add_rows(n)` adds empty rows and
    `feed(counts)` says that only the first counts[r] of the next step's T tokens of row r are real, the
    rest right padding. Padding writes keys/values past the row's end, where the mask hides them and the
    next step overwrites them; the row advances by its count, and the forward pass returns the logits of
    each row's last real token.
    """

    def __init__(self, config: CacheShape, device, dtype) -> None:
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        self._counts: list[int] | None = None  # real tokens per row in the next step (None: all T)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, positions) the storage holds now."""
        k = self.k  # one read: another thread (a server's stats) may ask while the cache is freed
        return (k[0].shape[0], k[0].shape[2]) if k else (0, 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.k) + list(self.v))

    def _reserve(self, rows: int, length: int) -> None:
        have_rows, have_len = self.capacity
        if rows <= have_rows and length <= have_len:
            return
        # Grow geometrically so that a growing batch or sequence copies the cache O(log n) times.
        new_rows = have_rows if rows <= have_rows else max(rows, min(2 * have_rows, rows + 64))
        new_len = have_len if length <= have_len else min(self.config.block_size, max(length, 2 * have_len, 64))
        shape = (new_rows, self.config.kv_heads, new_len, self.config.head_dim)
        for store in (self.k, self.v):
            for i in range(self.config.n_layer):
                fresh = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if i < len(store):
                    fresh[:have_rows, :, :have_len] = store[i]
                    store[i] = fresh
                else:
                    store.append(fresh)

    def append(self, source: KVCache | BatchKVCache, copies: int = 1, row: int = 0) -> int:
        """Add `copies` rows holding the sequence in row `row` of `source`; returns the first new row."""
        n = source.pos if isinstance(source, KVCache) else source.lengths[row]
        first = self.rows
        self._reserve(first + copies, n + 1)
        for layer in range(self.config.n_layer):
            for store, src in ((self.k, source.k), (self.v, source.v)):
                store[layer][first : first + copies, :, :n] = src[layer][row : row + 1, :, :n]
        self.lengths.extend([n] * copies)
        return first

    def add_rows(self, n: int) -> None:
        """`n` empty rows (length 0) at the end; their storage is reserved by the next step."""
        self.lengths.extend([0] * n)

    def feed(self, counts: list[int]) -> None:
        """The next step's tokens are real only up to counts[r] in row r (1 <= counts[r] <= T)."""
        if len(counts) != self.rows or min(counts, default=1) < 1:
            raise ValueError(f"feed needs one count >= 1 per row ({self.rows} rows), got {counts}")
        self._counts = list(counts)

    def remove(self, row: int) -> int | None:
        """Drop `row`; the last row moves into its place. Returns the moved row's old index, if any."""
        last = self.rows - 1
        moved = None
        if row != last:
            n = self.lengths[last]
            for store in (self.k, self.v):
                for t in store:
                    t[row, :, :n] = t[last, :, :n]
            self.lengths[row] = n
            moved = last
        self.lengths.pop()
        if not self.lengths:  # idle: give the memory back
            self.k, self.v = [], []
        return moved

    def begin_step(self, T: int) -> torch.Tensor:
        """Positions (rows, T) of the tokens fed next; sets up their writes and attention mask."""
        lengths = torch.tensor(self.lengths, device=self.device)
        end = max(self.lengths) + T
        self._reserve(self.rows, end)
        positions = lengths[:, None] + torch.arange(T, device=self.device)
        rows = torch.arange(self.rows, device=self.device)[:, None].expand(-1, T)
        # (rows, 1, T, end): token t of row r sees positions <= lengths[r] + t.
        mask = (torch.arange(end, device=self.device) <= positions[:, :, None])[:, None]
        self._step = (rows, positions, mask, end)
        return positions

    @property
    def step_mask(self) -> torch.Tensor:
        assert self._step is not None, "begin_step first"
        return self._step[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._step is not None, "begin_step first"
        rows, positions, _, end = self._step
        B = self.rows
        # k: (rows, heads, T, head_dim); indexing rows x positions puts those dims first.
        self.k[layer][rows, :, positions] = k.transpose(1, 2)
        self.v[layer][rows, :, positions] = v.transpose(1, 2)
        return self.k[layer][:B, :, :end], self.v[layer][:B, :, :end]

    def end_step(self, T: int) -> torch.Tensor | None:
        """Advance every row past its tokens; returns the index of each row's last real token in a
        ragged step (see `feed`), else None (the last token, T - 1, for every row)."""
        counts, self._counts, self._step = self._counts, None, None
        if counts is None:
            self.lengths = [n + T for n in self.lengths]
            return None
        if max(counts) > T:
            raise ValueError(f"feed counts {counts} exceed the {T} tokens of the step")
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]
        return torch.tensor(counts, device=self.device) - 1
