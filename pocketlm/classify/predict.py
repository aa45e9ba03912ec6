"""Batched classifier inference, and `pocketlm eval RUN --classify FILE` as a library function.

Rows are sorted by length and batched longest first, so a batch pads little; logits are returned in
the input order. Predictions go to a JSONL file beside the report (one line per row: its line in the
file, label, prediction, class probabilities).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pocketlm.classify.model import classifier_logits, pad_batch
from pocketlm.device import model_device


@torch.no_grad()
def predict_logits(model, ids: list[list[int]], *, pad_id: int, batch_size: int = 32, device=None,
                   precision: str | None = None, progress: bool = False) -> torch.Tensor:
    """(N, num_labels) float32 logits of token lists, in their order."""
    from tqdm import tqdm

    from pocketlm.device import autocast

    device = device or model_device(model)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = torch.empty(len(ids), model.score.out_features, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="classify", disable=not progress, file=sys.stderr, dynamic_ncols=True):
            rows = order[start:start + batch_size]
            x, mask = pad_batch([ids[i] for i in rows], pad_id, device=device)
            with autocast(torch.device(device), precision or "fp32"):
                logits = classifier_logits(model, x, mask)
            out[torch.tensor(rows)] = logits.float().cpu()
    finally:
        model.train(was_training)
    return out


def rows_logits(model, tokenizer, rows, info, **kw) -> tuple[torch.Tensor, int]:
    """(logits, truncated rows) of labelled rows for a saved classifier. A classifier trained on both
    orders of its pairs (--swap-pairs: a symmetric task) answers with the mean of its probabilities over
    (a, b) and (b, a), returned as log-probabilities."""
    from pocketlm.classify.data import encode_rows, swapped

    encoded = encode_rows(tokenizer, rows, info.max_length)
    logits = predict_logits(model, encoded.ids, pad_id=info.pad_id, **kw)
    if not (info.symmetric_pairs and rows and rows[0].text_pair is not None):
        return logits, encoded.truncated
    other = predict_logits(model, encode_rows(tokenizer, swapped(rows), info.max_length).ids, pad_id=info.pad_id, **kw)
    return ((logits.softmax(-1) + other.softmax(-1)) / 2).log(), encoded.truncated


def evaluate_classifier(source: str, path: str | Path, *, text_column: str | None = None,
                        label_column: str | None = None, text_pair_column: str | None = None,
                        batch_size: int = 32, device: str = "auto", precision: str | None = None,
                        limit: int | None = None, predictions: str | Path | None = None,
                        holdout: str | None = None, holdout_seed: int = 1337) -> dict:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix of a classifier on a file.

    The columns default to those the classifier was trained on. `predictions`: a JSONL file to write.
    `holdout`: score only that part (train, val, test) of the file's seeded split (finetune's, when the
    run had no --val-data).
    """
    from pocketlm.classify.data import label_ids, read_labelled, select_holdout
    from pocketlm.classify.io import load_classifier
    from pocketlm.classify.metrics import classification_metrics
    from pocketlm.device import pick_device
    from pocketlm.errors import UserError

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    dev = pick_device(device)
    model, tokenizer, info = load_classifier(source, device="cpu")
    # The file is checked before any inference: a wrong column fails in a second.
    data = read_labelled(path, text_column or info.text_column, label_column or info.label_column,
                         text_pair_column if text_pair_column is not None else info.text_pair_column)
    rows, note = select_holdout(data.rows, holdout, holdout_seed)
    if note:
        print(f"pocketlm eval: {note}", file=sys.stderr)
    rows = rows[:limit] if limit else rows
    labels = label_ids(rows, info.labels, str(path))
    model.to(dev)
    logits, truncated = rows_logits(model, tokenizer, rows, info, batch_size=batch_size, device=dev,
                                    precision=precision, progress=True)
    preds = logits.argmax(dim=-1).tolist()
    result = classification_metrics(labels, preds, info.labels)
    result.update(skipped_rows=data.skipped_total, skipped_reasons=dict(data.skipped),
                  truncated_rows=truncated, max_length=info.max_length, holdout=note,
                  both_pair_orders=bool(info.symmetric_pairs and info.text_pair_column))
    if predictions is not None:
        from pocketlm.atomic import atomic_write_text

        probs = logits.softmax(dim=-1).tolist()
        lines = [json.dumps({"line": r.line, "label": r.label, "pred": info.labels[p],
                             "correct": p == y, "probs": [round(x, 6) for x in pr]})
                 for r, y, p, pr in zip(rows, labels, preds, probs)]
        atomic_write_text(predictions, "".join(x + "\n" for x in lines))
        result["predictions_file"] = str(predictions)
    return result
