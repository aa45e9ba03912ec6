"""`pocketlm finetune --task classify`: a classifier trained through the one Trainer.

Order: read and check the labelled files (a wrong column fails before any model loads), split a file
that has no --val-data into seeded train/val/test parts (written to RUN/splits/ and said so), encode,
load the base, attach the head, set up the method (head: base frozen; full: everything; lora/qlora:
adapters + head), then `Trainer(..., objective, batch_source, metric)` with validation accuracy picking
the best checkpoint. A held-out test part, when there is one, is scored with the best checkpoint at the end.

The Trainer counts in tokens: a classification step is `batch_size` rows, so the recipe's context is
the row length cap (--max-length) and batch_tokens = batch_size * max_length (RUN/config.yaml shows it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from pocketlm.classify.data import (
    LabelledData,
    Row,
    class_labels,
    encode_rows,
    label_ids,
    read_labelled,
    split_rows,
    swapped,
    write_rows,
)
from pocketlm.classify.io import ClassifierInfo, ClassifierSaver
from pocketlm.classify.model import attach_head, set_trainable
from pocketlm.classify.train import AccuracyMetric, ClassificationBatchSource, ClassificationObjective
from pocketlm.errors import UserError
from pocketlm.names import CLASSIFY_METHODS
from pocketlm.rundir import RunDir


@dataclass
class ClassifyOptions:
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    val_data: str | None = None  # else a seeded split of --data
    val_fraction: float = 0.1
    test_fraction: float = 0.1  # only when the file is split
    max_length: int = 256  # tokens per row (longer texts are cut and counted)
    batch_size: int = 16  # rows per optimizer step
    swap_pairs: bool = False  # train on (b, a) beside every (a, b): symmetric tasks get twice the rows


def say(message: str) -> None:
    print(f"classify: {message}", file=sys.stderr)


def _skipped(data: LabelledData) -> str:
    if not data.skipped_total:
        return ""
    return f", {data.skipped_total} malformed rows skipped ({', '.join(f'{k}: {v}' for k, v in data.skipped.items())})"


def load_splits(cfg, opts: ClassifyOptions) -> tuple[list[Row], list[Row], list[Row], list, dict]:
    """(train, val, test rows, classes, notes): --val-data, or a seeded split of --data (seed cfg.seed)."""
    train_data = read_labelled(cfg.data, opts.text_column, opts.label_column, opts.text_pair_column)
    classes = class_labels(train_data.rows, cfg.data)
    notes: dict = {"skipped_rows": {cfg.data: dict(train_data.skipped)}}
    if opts.val_data:
        val_data = read_labelled(opts.val_data, opts.text_column, opts.label_column, opts.text_pair_column)
        label_ids(val_data.rows, classes, opts.val_data)
        notes["skipped_rows"][opts.val_data] = dict(val_data.skipped)
        say(f"train {len(train_data.rows):,} rows from {cfg.data}{_skipped(train_data)}; validation "
            f"{len(val_data.rows):,} rows from {opts.val_data}{_skipped(val_data)}")
        return train_data.rows, val_data.rows, [], classes, notes
    train, val, test = split_rows(train_data.rows, cfg.seed, opts.val_fraction, opts.test_fraction)
    split_dir = RunDir(cfg.out).splits_dir
    for name, part in (("train", train), ("val", val), ("test", test)):
        if part:
            write_rows(split_dir / f"{name}.jsonl", part, opts.text_column, opts.label_column, opts.text_pair_column)
    notes["split"] = {"source": cfg.data, "seed": cfg.seed, "val_fraction": opts.val_fraction,
                      "test_fraction": opts.test_fraction, "train": len(train), "val": len(val), "test": len(test),
                      "folder": str(split_dir)}
    say(f"no --val-data: split {cfg.data} ({len(train_data.rows):,} usable rows{_skipped(train_data)}) with seed "
        f"{cfg.seed} into train {len(train):,} / val {len(val):,} / test {len(test):,}; written to {split_dir}/")
    return train, val, test, classes, notes


def _build_model(cfg, method: str, num_labels: int, adapter):
    """(model with its head and trainable parameters set, tokenizer, inner saver, trainable count)."""
    from pocketlm.finetune import build_for_method, load_base
    from pocketlm.train import FullModelSaver

    model, tokenizer = load_base(cfg.model)
    attach_head(model, num_labels, seed=cfg.seed)
    if method in ("head", "full"):
        set_trainable(model, method)
        inner = FullModelSaver()
    else:
        torch.manual_seed(cfg.seed)  # the adapter's random init follows --seed
        inner, _ = build_for_method(model, method, adapter, cfg.model)
        set_trainable(model, method)
    trainable = model.num_parameters(trainable_only=True)
    total = model.num_parameters()
    say(f"{method}: {trainable:,} trainable parameters of {total:,} ({trainable / total:.4%}), "
        f"head {model.score.weight.numel():,}")
    return model, tokenizer, inner, trainable


def _recipe(cfg, opts: ClassifyOptions):
    if opts.batch_size < 1 or opts.batch_size % cfg.micro_batch and opts.batch_size > cfg.micro_batch:
        raise UserError(f"--batch-size ({opts.batch_size}) must be a positive multiple of --micro-batch "
                        f"({cfg.micro_batch}): e.g. --batch-size {max(1, opts.batch_size // cfg.micro_batch) * cfg.micro_batch}")
    micro = min(cfg.micro_batch, opts.batch_size)
    return replace(cfg, context=opts.max_length, context_schedule=None, micro_batch=micro,
                   batch_tokens=opts.batch_size * opts.max_length)


def finetune_classifier(cfg, opts: ClassifyOptions) -> dict:
    """Train a classifier on cfg.data from base cfg.model with cfg.method (head, full, lora, qlora; LoRA
    settings in cfg.adapter); returns the run's summary."""
    from pocketlm.train import Trainer

    if cfg.method not in CLASSIFY_METHODS:
        raise UserError(f"unknown method {cfg.method!r} for --task classify: choose {', '.join(CLASSIFY_METHODS)}")
    if opts.max_length < 3:
        raise UserError(f"--max-length must be at least 3 tokens, got {opts.max_length}")
    _recipe(cfg, opts)  # settings checked before anything loads
    if RunDir(cfg.out).checkpoint("latest") is not None and not cfg.resume:
        raise UserError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out")
    if opts.swap_pairs and not opts.text_pair_column:
        raise UserError("--swap-pairs needs text pairs: pass --text-pair-column too, or drop --swap-pairs")
    train_rows, val_rows, test_rows, classes, notes = load_splits(cfg, opts)
    if opts.swap_pairs:  # after the split, so val and test hold no pair whose mirror was trained on
        train_rows = train_rows + swapped(train_rows)
        notes["swap_pairs"] = True
        say(f"--swap-pairs: training on {len(train_rows):,} rows (every pair in both orders)")
    model, tokenizer, inner, trainable = _build_model(cfg, cfg.method, len(classes), cfg.adapter)
    if opts.max_length > model.config.block_size:  # longer texts are cut to the model's context, not refused
        say(f"--max-length {opts.max_length} is longer than the model's context: using {model.config.block_size}")
        opts = replace(opts, max_length=model.config.block_size)
    cfg = _recipe(cfg, opts)
    encoded = {name: encode_rows(tokenizer, rows, opts.max_length)
               for name, rows in (("train", train_rows), ("val", val_rows), ("test", test_rows)) if rows}
    cut = {k: v.truncated for k, v in encoded.items() if v.truncated}
    if cut:
        say(f"texts longer than {opts.max_length} tokens were cut: " + ", ".join(f"{k} {v:,}" for k, v in cut.items()))
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    info = ClassifierInfo(labels=classes, text_column=opts.text_column, label_column=opts.label_column,
                          text_pair_column=opts.text_pair_column, max_length=opts.max_length,
                          separator_id=tokenizer.eos_id if opts.text_pair_column else None, pad_id=pad,
                          method=cfg.method, base=cfg.model, symmetric_pairs=opts.swap_pairs)
    precision = None if cfg.precision == "auto" else cfg.precision
    source = ClassificationBatchSource(encoded["train"].ids, label_ids(train_rows, classes), seed=cfg.seed,
                                       pad_id=pad, max_length=opts.max_length, tokenizer_identity=tokenizer.identity,
                                       description=f"labelled rows of {cfg.data}")
    metric = AccuracyMetric(encoded["val"].ids, label_ids(val_rows, classes), pad_id=pad, precision=precision)
    extra = {"task": "classify", "classes": [str(c) for c in classes], "trainable_params": trainable,
             "truncated_rows": cut, **notes}
    summary = Trainer(model, tokenizer, cfg, saver=ClassifierSaver(inner, info), objective=ClassificationObjective(),
                      batch_source=source, metric=metric, extra_summary=extra).train()
    if test_rows:
        summary.update(_score_test(cfg.out, test_rows, classes))
        RunDir(cfg.out).write_summary(summary)
    return summary


def _score_test(run: str, rows: list[Row], classes: list) -> dict:
    """The best checkpoint on the held-out test part of the split."""
    from pocketlm.classify.io import load_classifier
    from pocketlm.classify.metrics import classification_metrics
    from pocketlm.classify.predict import rows_logits

    model, tokenizer, info = load_classifier(run)
    preds = rows_logits(model, tokenizer, rows, info)[0].argmax(-1).tolist()
    result = classification_metrics(label_ids(rows, classes), preds, classes)
    say(f"test part ({len(rows):,} rows), best checkpoint: accuracy {result['accuracy']:.4f}, "
        f"macro-F1 {result['macro_f1']:.4f}")
    return {"test_accuracy": result["accuracy"], "test_macro_f1": result["macro_f1"]}
