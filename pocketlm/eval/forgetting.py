"""Forgetting: how much general ability an adapted model lost, on the same probes as its base.

A probe is held-out general text (loss, perplexity, bits per byte) and/or a multiple-choice set (acc,
acc_norm). `compare` lines up the base ("before") and adapted ("after") numbers with their difference
(after - before): a higher loss or a lower accuracy after adaptation is forgetting.
"""

from __future__ import annotations

import math

# Metrics where a larger number is worse; the rest (accuracies) are better when larger.
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")
PROBE_METRICS = ("loss", "perplexity", "bits_per_byte", "acc", "acc_norm", "accuracy", "accuracy_calibrated")


def compare(before: dict, after: dict, keys: tuple[str, ...] = PROBE_METRICS) -> dict[str, dict]:
    """{metric: {"before", "after", "delta", "worse"}} for every metric both sides report."""
    out = {}
    for key in keys:
        b, a = before.get(key), after.get(key)
        if not isinstance(b, (int, float)) or not isinstance(a, (int, float)):
            continue
        delta = a - b
        worse = delta > 0 if key in LOWER_IS_BETTER else delta < 0
        out[key] = {"before": b, "after": a, "delta": delta, "worse": bool(worse and not math.isclose(a, b))}
    return out


def run_probes(model, tokenizer, *, text: str | None = None, items=None, context: int | None = None,
               stride: int | None = None, batch_size: int | None = None, precision: str | None = None,
               max_tokens: int | None = None) -> dict:
    """The probe metrics of one model: loss/perplexity/bits_per_byte on `text`, acc/acc_norm on `items`."""
    from pocketlm.eval.likelihood import evaluate_text
    from pocketlm.eval.multiple_choice import evaluate_multiple_choice

    metrics: dict = {}
    if text is not None:
        r = evaluate_text(model, tokenizer, text, context=context, stride=stride, batch_size=batch_size,
                          precision=precision, max_tokens=max_tokens)
        metrics.update(loss=r.loss, perplexity=r.perplexity, bits_per_byte=r.bits_per_byte)
    if items:
        r = evaluate_multiple_choice(model, tokenizer, items, context=context, precision=precision)
        metrics.update(acc=r["acc"], acc_norm=r["acc_norm"])
    return metrics


def forgetting(base_model, adapted_model, tokenizer, **probe_kwargs) -> dict[str, dict]:
    """Run the same probes on both models and compare them."""
    return compare(run_probes(base_model, tokenizer, **probe_kwargs),
                   run_probes(adapted_model, tokenizer, **probe_kwargs))
