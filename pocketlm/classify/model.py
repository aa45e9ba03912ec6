"""A classification head on any pocketlm GPT: a linear layer on the final hidden state of each
sequence's last real token (Hugging Face's *ForSequenceClassification design, whose names it uses).

The head is attached to the GPT itself as `model.score` (nn.Linear(n_embd, num_labels, bias=False),
as transformers' `score`), so everything that handles a GPT handles a classifier too: LoRA wrapping,
the trainer's optimizer and frozen-weight storage, checkpoint savers (`score.weight` passes through
`pocketlm.io.hf`'s renaming unchanged, which is the name transformers expects).

Padding: the last real token is found from the attention mask, never from a pad token id, so padding
that equals end-of-text (or a text that contains it) is handled. Rows are packed to the left first
(real tokens keep their order): under causal attention a token sees only what precedes it, so a
right-padded row needs no attention mask at all and left padding costs nothing extra; positions start
at each row's first real token, as transformers' left-padding position ids do.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from pocketlm.device import autocast_dtype
from pocketlm.errors import UserError
from pocketlm.model import recomputed_blocks

HEAD = "score"


def attach_head(model: nn.Module, num_labels: int, *, seed: int | None = None) -> nn.Linear:
    """Add `model.score` (num_labels outputs, no bias), initialised as transformers' `_init_weights`."""
    if num_labels < 2:
        raise UserError(f"a classifier needs at least two classes, got {num_labels}")
    ref = model.transformer.wte.weight
    head = nn.Linear(model.config.n_embd, num_labels, bias=False, device=ref.device)
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        weight = torch.empty(head.weight.shape).normal_(0.0, 0.02, generator=generator)
        head.weight.copy_(weight)
    model.add_module(HEAD, head)
    return head


def has_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, HEAD, None), nn.Module)


def hidden_states(model: nn.Module, idx: torch.Tensor, *, final_norm: bool = True) -> torch.Tensor:
    """(B, T, n_embd) hidden states of a causal GPT for right-padded (or unpadded) rows, without the LM head.

    The same computation as GPT.forward up to ln_f (tests check they agree), minus the vocabulary
    projection, which a classifier does not need and which costs about a fifth of smollm2-135m's forward.
    """
    cfg = model.config
    B, T = idx.shape
    if T > cfg.block_size:
        raise UserError(f"sequence of {T} tokens is longer than the model's context of {cfg.block_size}: "
                        "lower --max-length")
    x = model.transformer.wte(idx)
    rope = None
    if cfg.family == "gpt2":
        x = x + model.transformer.wpe(torch.arange(T, device=idx.device))
    else:
        rope = model._rope(0, T, idx.device)
    x = model.transformer.drop(x)
    recompute = recomputed_blocks(model) if model.training and torch.is_grad_enabled() else 0
    for layer, block in enumerate(model.transformer.h):
        if layer < recompute:
            x = torch.utils.checkpoint.checkpoint(block, x, rope, None, layer, use_reentrant=False)
        else:
            x = block(x, rope, None, layer)
    return model.transformer.ln_f(x) if final_norm else x


def pack_left(input_ids: torch.Tensor, attention_mask: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with each row's real tokens first, lengths): any padding side becomes right padding, and
    trailing columns no row uses are dropped."""
    if attention_mask is None:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        return input_ids, lengths
    if attention_mask.shape != input_ids.shape:
        raise UserError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                        f"{tuple(input_ids.shape)}")
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise UserError("a row has no real tokens (its attention mask is all zeros): every text needs a token")
    width = int(lengths.max())
    right_padded = bool(torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]))
    if not right_padded:  # stable sort: real tokens (mask 1) first, in their order
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        input_ids = input_ids.gather(1, order)
    return input_ids[:, :width], lengths


def length_groups(lengths: list[int], overhead: int) -> list[list[int]]:
    """Rows split into groups of similar length that minimise padded tokens + `overhead` per group.

    A padded batch computes every position up to its longest row; run as a few sub-batches of similar
    lengths, it computes little padding at the price of a few more (smaller) forward passes. Exact
    dynamic programming over the rows sorted by length (a batch has tens of rows).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # rows i..j-1 form the last group, padded to sizes[j - 1]
            cost = best[i] + (j - i) * sizes[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _pooled_logits(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    hidden = hidden_states(model, ids, final_norm=False)
    last = hidden[torch.arange(ids.shape[0], device=ids.device), lengths - 1]  # (B, n_embd)
    # ln_f works per token: normalising only the pooled rows gives the same numbers for less work.
    pooled = model.transformer.ln_f(last)
    head = getattr(model, HEAD)
    return head(pooled if autocast_dtype(pooled.device.type) is not None else pooled.to(head.weight.dtype))


def classifier_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      *, group_overhead: int | None = None) -> torch.Tensor:
    """(B, num_labels) logits from the hidden state of each row's last real token.

    group_overhead (tokens): run the batch as sub-batches of similar lengths (length_groups) when that
    saves more padded positions than it costs; each row's logits are the same either way.
    """
    if not has_head(model):
        raise UserError("the model has no classification head: load it with pocketlm.classify.io.load_classifier "
                        "or add one with attach_head")
    ids, lengths = pack_left(input_ids, attention_mask)
    if group_overhead is None or ids.shape[0] < 2:
        return _pooled_logits(model, ids, lengths)
    groups = length_groups(lengths.tolist(), group_overhead)
    if len(groups) == 1:
        return _pooled_logits(model, ids, lengths)
    parts = []
    for group in groups:
        index = torch.tensor(group, device=ids.device)
        sub_lengths = lengths[index]
        parts.append(_pooled_logits(model, ids[index, : int(sub_lengths.max())], sub_lengths))
    order = torch.tensor([i for g in groups for i in g], device=ids.device)
    return torch.cat(parts)[torch.argsort(order)]


def pad_batch(rows: list[list[int]], pad_id: int, *, side: str = "right", device=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token lists, padded with pad_id on `side`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "right":
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        else:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return (ids.to(device), mask.to(device)) if device is not None else (ids, mask)


def set_trainable(model: nn.Module, method: str) -> None:
    """head: only the head trains; full: everything; lora/qlora: the adapters (already set) and the head."""
    if method == "head":
        for p in model.parameters():
            p.requires_grad_(False)
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    getattr(model, HEAD).weight.requires_grad_(True)
