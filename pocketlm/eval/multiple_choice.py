"""Multiple choice by log-likelihood, in HellaSwag's format, scored as lm-evaluation-harness does.

Each item is {"ctx": str, "endings": [str, ...], "label": int} (JSONL, one item a line). For every
ending the model scores the continuation " " + ending after ctx (lm-eval's target delimiter is a space):

- acc:      the ending with the highest summed log-probability of its tokens is the prediction;
- acc_norm: the highest summed log-probability divided by the ending's length in UTF-8 bytes
            (lm-eval divides by len(ending) in characters; HellaSwag's endings are ASCII, so equal).

Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation,
context + continuation is encoded whole and the continuation tokens are those after the context's own
tokens; an empty context is replaced by the start token. A too-long pair is cut from the left to the
model's context. Requests are batched longest first, padded on the right, and only the continuation's
tokens are scored. (Karpathy's nanoGPT/llm.c HellaSwag instead averages the per-token loss; its numbers
differ from these.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pocketlm.device import model_device
from pocketlm.errors import UserError
from pocketlm.eval.jsonl import jsonl_rows
from pocketlm.eval.likelihood import _autocast, model_context, start_token


@dataclass
class Item:
    context: str
    endings: list[str]
    label: int


def read_multiple_choice(path: str | Path, limit: int | None = None) -> list[Item]:
    """Items from a HellaSwag-style JSONL file (ctx, endings, label); the first `limit` if given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a JSONL file with ctx, endings and label fields")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive number of items, got {limit}")
    items: list[Item] = []
    with path.open(encoding="utf-8") as f:
        for n, row in jsonl_rows(f, path):
            items.append(_item(row, path, n))
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise UserError(f"{path} has no items")
    return items


def _item(row, path: Path, n: int) -> Item:
    if not isinstance(row, dict):
        raise UserError(f"{path}:{n} is not a JSON object")
    ctx = row.get("ctx", row.get("context"))
    endings = row.get("endings", row.get("choices"))
    label = row.get("label")
    if not isinstance(ctx, str) or not isinstance(endings, list) or not endings \
            or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{path}:{n} needs a string `ctx` and a non-empty list of strings `endings`")
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise UserError(f"{path}:{n} needs an integer `label` (the index of the right ending)") from None
    if not 0 <= label < len(endings):
        raise UserError(f"{path}:{n}: label {label} is not an index into its {len(endings)} endings")
    return Item(ctx, endings, label)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair: (context tokens, continuation tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 16,
                          context: int | None = None, precision: str | None = None) -> list[float]:
    """Summed log-probability of each continuation given its context: [(ctx_ids, cont_ids)] -> [float]."""
    max_len = model_context(model, context)
    device = model_device(model)
    prepared = []
    for ctx, cont in requests:
        if not cont:
            raise UserError("a continuation has no tokens: every ending must contain text")
        whole = (ctx + cont)[-(max_len + 1):]
        n_cont = min(len(cont), len(whole) - 1)  # a continuation longer than the context loses its head
        prepared.append((whole[:-1], cont[len(cont) - n_cont:]))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    out = [0.0] * len(prepared)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prepared[i][0]) for i in rows)
            inputs = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                inputs[r, : len(prepared[i][0])] = torch.tensor(prepared[i][0])
            with _autocast(device, precision):
                logits, _ = model(inputs.to(device))
            for r, i in enumerate(rows):
                inp, cont = prepared[i]
                # Logits at position p predict token p + 1: the continuation's predictions end at len(inp).
                picked = logits[r, len(inp) - len(cont): len(inp)].float().log_softmax(-1)
                target = torch.tensor(cont, device=picked.device)
                out[i] = float(picked.gather(1, target[:, None]).sum())
    finally:
        model.train(was_training)
    return out


def evaluate_multiple_choice(model, tokenizer, items: list[Item], *, batch_size: int = 16,
                             context: int | None = None, precision: str | None = None) -> dict:
    """{"acc", "acc_norm", "items", "details": [per item: label, pred, pred_norm, logprobs]}."""
    requests = []
    start = start_token(tokenizer)
    for item in items:
        for ending in item.endings:
            ctx, cont = encode_pair(tokenizer, item.context, " " + ending)
            if not ctx:  # lm-eval scores an empty context after the end-of-text token
                if start is None:
                    raise UserError("an item has an empty ctx and the tokenizer has no start token to use")
                ctx = [start]
            requests.append((ctx, cont))
    scores = continuation_logprobs(model, requests, batch_size=batch_size, context=context, precision=precision)
    details, correct, correct_norm = [], 0, 0
    position = 0
    for index, item in enumerate(items):
        lls = scores[position: position + len(item.endings)]
        position += len(item.endings)
        normed = [ll / max(1, len(e.encode("utf-8"))) for ll, e in zip(lls, item.endings)]
        pred = max(range(len(lls)), key=lambda k: (lls[k], -k))  # first maximum, like numpy.argmax
        pred_norm = max(range(len(normed)), key=lambda k: (normed[k], -k))
        correct += pred == item.label
        correct_norm += pred_norm == item.label
        details.append({"index": index, "label": item.label, "pred": pred, "pred_norm": pred_norm,
                        "logprobs": lls})
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "items": n, "details": details}
