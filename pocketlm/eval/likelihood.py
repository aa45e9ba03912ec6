"""Loss, perplexity and bits per byte of a text or a prepared split, with sliding windows.

Every token of the text is scored exactly once. The text is preceded by the tokenizer's BOS token (or,
without one, its end-of-text token, as GPT-2 starts documents), which is context only, so the first
token is scored too; a tokenizer with neither leaves the first token unscored.

Texts longer than the context are scored in windows of `context` tokens that advance by `stride`
(Hugging Face's "perplexity of fixed-length models"): the first window scores all its tokens, each later
window scores only its last `stride` tokens, which have at least `context - stride` tokens of context.
stride = context gives disjoint windows (fast, less context); smaller strides cost more forward passes.

bits per byte = total nats / ln 2 / UTF-8 bytes of the text. Unlike perplexity it does not depend on the
tokenizer, so it compares models with different vocabularies. For a prepared split the end-of-text
tokens between documents are scored (as the training loop's validation loss does) but add no bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pocketlm.device import model_device
from pocketlm.errors import UserError
from pocketlm.model import GPT

DEFAULT_MAX_CONTEXT = 2048  # default window: the model's context, capped (long contexts are slow on CPU)


@dataclass
class LikelihoodResult:
    loss: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float
    bits_per_byte: float | None
    tokens: int  # tokens scored
    bytes: int | None
    total_nats: float
    windows: int
    context: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(n_targets: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence whose targets are positions 1..n_targets (position 0 is context only).

    Each window is (begin, end, n_scored): the model reads seq[begin:end], predicts seq[begin+1:end+1]
    and the last n_scored of those predictions are counted. Every target is counted exactly once.
    """
    if context < 1 or stride < 1:
        raise UserError(f"context ({context}) and stride ({stride}) must be at least 1")
    if stride > context:
        raise UserError(f"stride ({stride}) must not exceed the context ({context}): tokens would be skipped")
    if n_targets <= 0:
        return []
    end = min(context, n_targets)
    windows = [(0, end, end)]
    while end < n_targets:
        new_end = min(end + stride, n_targets)
        begin = max(0, new_end - context)
        windows.append((begin, new_end, new_end - end))
        end = new_end
    return windows


def _autocast(device: torch.device, precision: str | None):
    from pocketlm.device import autocast

    # Reported numbers default to fp32: bf16 rounding moves perplexities in the third digit.
    return autocast(device, precision or "fp32")


def model_context(model, requested: int | None) -> int:
    block = int(model.config.block_size)
    if requested is None:
        return min(block, DEFAULT_MAX_CONTEXT)
    if requested < 2:
        raise UserError(f"--context must be at least 2, got {requested}")
    if requested > block:
        raise UserError(f"--context {requested} is longer than the model's context of {block}: use at most {block}")
    return requested


def default_batch_size(context: int, device: torch.device) -> int:
    """Windows per forward pass: about 2k tokens on CPU, 32k on a GPU (logits dominate the memory)."""
    budget = 32768 if device.type == "cuda" else 2048
    return max(1, budget // context)


@torch.no_grad()
def score_tokens(model, tokens, *, prefix: int | None = None, context: int | None = None,
                 stride: int | None = None, batch_size: int | None = None,
                 precision: str | None = None) -> tuple[torch.Tensor, int]:
    """Negative log-likelihood (nats, float64, CPU) of every scored token, and the number of windows.

    `tokens`: a sequence of ids. With `prefix` (a BOS/end-of-text id) every token is scored; without,
    the first token is context only.
    """
    context = model_context(model, context)
    stride = stride or max(1, context // 2)
    seq = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if prefix is not None:
        seq = torch.cat([torch.tensor([prefix], dtype=torch.long), seq])
    n_targets = max(0, seq.numel() - 1)
    windows = sliding_windows(n_targets, context, stride)
    device = model_device(model)
    batch_size = batch_size or default_batch_size(context, device)
    nll = torch.empty(n_targets, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(windows), batch_size):
            group = windows[start:start + batch_size]
            inputs = torch.stack([seq[b:e] for b, e, _ in group]).to(device)
            targets = torch.stack([seq[b + 1:e + 1] for b, e, _ in group])
            for row, (b, e, n) in enumerate(group):
                targets[row, : e - b - n] = -100  # context only: the head need not run there
            with _autocast(device, precision):
                losses = _token_losses(model, inputs, targets.to(device)).double().cpu()
            for row, (_, e, n) in enumerate(group):
                nll[e - n:e] = losses[row, -n:]
    finally:
        model.train(was_training)
    return nll, len(windows)


def _token_losses(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each target's cross-entropy (B, T), fp32; -100 targets are not scored."""
    if isinstance(model, GPT):  # the head only where scored, in chunks: no (tokens x vocab) logits
        return model(inputs, targets, return_logits=False, reduction="none")[1]
    logits = model(inputs)[0]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def _result(nll: torch.Tensor, n_bytes: int | None, windows: int, context: int, stride: int) -> LikelihoodResult:
    if nll.numel() == 0:
        raise UserError("nothing to score: the text has no tokens after the first")
    total = float(nll.sum())
    loss = total / nll.numel()
    bpb = total / math.log(2) / n_bytes if n_bytes else None
    return LikelihoodResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=bpb,
                            tokens=int(nll.numel()), bytes=n_bytes, total_nats=total, windows=windows,
                            context=context, stride=stride)


def start_token(tokenizer) -> int | None:
    """The token a text is scored after: BOS, else end-of-text (GPT-2's document separator)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def evaluate_text(model, tokenizer, text: str, *, context: int | None = None, stride: int | None = None,
                  batch_size: int | None = None, precision: str | None = None,
                  max_tokens: int | None = None) -> LikelihoodResult:
    """Loss, perplexity and bits per byte of `text` (the first `max_tokens` tokens if given)."""
    ids = tokenizer.encode(text)
    n_bytes = len(text.encode("utf-8"))
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        n_bytes = len(tokenizer.decode(ids).encode("utf-8"))
    ctx = model_context(model, context)
    stride = stride or max(1, ctx // 2)
    nll, windows = score_tokens(model, ids, prefix=start_token(tokenizer), context=ctx, stride=stride,
                                batch_size=batch_size, precision=precision)
    return _result(nll, n_bytes, windows, ctx, stride)


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file: give a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc}): convert it first") from exc


# -- prepared splits ------------------------------------------------------------------------------

def load_split_tokens(data_dir: str | Path, split: str, max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """A prepared split's tokens (the first `max_tokens` if given) as one int64 array, and the manifest."""
    from pocketlm.data.prepare import load_manifest, split_memmaps

    manifest = load_manifest(data_dir)
    parts, have = [], 0
    for shard in split_memmaps(data_dir, split, manifest):
        take = shard if max_tokens is None else shard[: max_tokens - have]
        parts.append(np.asarray(take, dtype=np.int64))
        have += len(take)
        if max_tokens is not None and have >= max_tokens:
            break
    if not have:
        raise UserError(f"split {split!r} of {data_dir} has no tokens: prepare it with more validation data")
    return np.concatenate(parts), manifest


def evaluate_split(model, tokenizer, data_dir: str | Path, split: str = "val", *, context: int | None = None,
                   stride: int | None = None, batch_size: int | None = None, precision: str | None = None,
                   max_tokens: int | None = None) -> LikelihoodResult:
    """Loss, perplexity and bits per byte of a prepared split, read as one stream of documents."""
    from pocketlm.tokenizer import check_same_tokenizer

    tokens, manifest = load_split_tokens(data_dir, split, max_tokens)
    data_identity = (manifest.get("tokenizer") or {}).get("identity")
    if data_identity:
        check_same_tokenizer(data_identity, tokenizer.identity, f"{data_dir}", "the model")
    eot = manifest.get("eot_id", tokenizer.eos_id)
    # Text bytes: each document decoded whole (so multi-byte characters split across tokens count once).
    n_bytes = 0
    boundaries = np.flatnonzero(tokens == eot) if eot is not None else np.zeros(0, dtype=np.int64)
    start = 0
    for stop in [*boundaries.tolist(), len(tokens)]:
        if stop > start:
            n_bytes += len(tokenizer.decode(tokens[start:stop].tolist()).encode("utf-8"))
        start = stop + 1
    ctx = model_context(model, context)
    stride = stride or max(1, ctx // 2)
    nll, windows = score_tokens(model, tokens, prefix=eot, context=ctx, stride=stride, batch_size=batch_size,
                                precision=precision)
    return _result(nll, n_bytes, windows, ctx, stride)
