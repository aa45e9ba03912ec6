"""Zero-shot classification probes for generative models: a prompt template and one verbalization per
class, scored by likelihood exactly as multiple-choice evaluation scores endings.

For every row the prompt is the template filled with the row's text(s); each class's verbalization
(" positive", " Yes", ...) is a continuation of it, and the prediction is the class whose continuation has
the highest summed log-probability (pocketlm.eval.multiple_choice.continuation_logprobs; lm-eval's
context/continuation split). `accuracy` is that; `accuracy_calibrated` first subtracts each class's
log-probability after a content-free input ("N/A" for every text, Zhao et al. 2021), which removes the
model's prior for one word over another; `majority_accuracy` is the share of the most common class.

Built-in probes (columns default to the CS224N files'):
- sentiment:  "Review:{text}\nSentiment:" -> 2 classes " negative"/" positive" (CFIMDB), 5 classes
              " terrible"/" bad"/" neutral"/" good"/" great" (SST-5), string labels verbalize themselves.
- paraphrase: "Question 1: {text}\nQuestion 2: {text_pair}\nDo these two questions ask the same thing? Answer:"
              -> " No"/" Yes" (Quora `is_duplicate` 0/1).
A custom probe gives --template (with {text}, and {text_pair} for pairs) and --verbalizers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from pocketlm.errors import UserError


@dataclass
class Probe:
    template: str
    verbalizers: dict[int, list[str]] = field(default_factory=dict)  # number of classes -> words
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None


PROBES = {
    "sentiment": Probe("Review:{text}\nSentiment:",
                       {2: ["negative", "positive"], 5: ["terrible", "bad", "neutral", "good", "great"]},
                       text_column="sentence", label_column="sentiment"),
    "paraphrase": Probe("Question 1: {text}\nQuestion 2: {text_pair}\nDo these two questions ask the same "
                        "thing? Answer:", {2: ["No", "Yes"]},
                        text_column="sentence1", label_column="is_duplicate", text_pair_column="sentence2"),
}


def get_probe(name: str, template: str | None = None, verbalizers: list[str] | None = None) -> Probe:
    """A built-in probe (its template/words replaced by any given), or `custom` with a template. A typed
    \\n or \\t in a template (as a shell passes it) is a newline or tab."""
    if template:
        template = template.replace("\\n", "\n").replace("\\t", "\t")
    if name == "custom":
        if not template:
            raise UserError("--zero-shot custom needs --template, e.g. 'Review:{text}\\nSentiment:'")
        return Probe(template, {len(verbalizers): verbalizers} if verbalizers else {})
    if name not in PROBES:
        raise UserError(f"unknown zero-shot probe {name!r}: choose {', '.join(PROBES)} or custom (--template)")
    base = PROBES[name]
    return Probe(template or base.template, {len(verbalizers): verbalizers} if verbalizers else base.verbalizers,
                 base.text_column, base.label_column, base.text_pair_column)


def _check_template(template: str, pair: bool) -> None:
    try:
        template.format(text="", text_pair="")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"the template {template!r} is not valid: use {{text}} (and {{text_pair}}); "
                        f"write literal braces as {{{{ }}}} ({exc})") from None
    if "{text}" not in template:
        raise UserError(f"the template {template!r} has no {{text}} placeholder")
    if pair and "{text_pair}" not in template:
        raise UserError("the rows have a second text (--text-pair-column) but the template has no {text_pair}")


def probe_classes(probe: Probe, rows) -> list:
    """The classes, in label order. Integer labels 0..K-1 take the probe's K-word verbalizer (the smallest
    K that covers the largest label), so a sample missing a class keeps the full label set."""
    from pocketlm.classify.data import class_labels

    labels = {r.label for r in rows}
    if labels and all(isinstance(x, int) for x in labels) and min(labels) >= 0:
        fits = sorted(k for k in probe.verbalizers if k > max(labels))
        if fits:
            return list(range(fits[0]))
    return class_labels(rows)


def class_words(probe: Probe, classes: list) -> list[str]:
    if len(classes) in probe.verbalizers:
        words = probe.verbalizers[len(classes)]
    elif all(isinstance(c, str) for c in classes):
        words = list(classes)  # string labels say what they are
    else:
        raise UserError(f"the data has {len(classes)} classes ({classes[:6]}) and the probe has no words for "
                        "them: give --verbalizers, one per class in label order, e.g. 'negative,positive'")
    if len(words) != len(classes):
        raise UserError(f"{len(words)} verbalizers for {len(classes)} classes: give one per class")
    return [w.strip() for w in words]


@torch.no_grad()
def single_token_logprobs(model, requests: list[tuple[list[int], list[int]]], k: int, *, batch_size: int = 16,
                          context: int | None = None, precision: str | None = None) -> list[float] | None:
    """continuation_logprobs for the common case of one-token words after a shared prompt: one forward
    pass per prompt (not per word) and the vocabulary projection at its last position only. None when
    some word is several tokens or the k requests of a prompt differ in context (then the general path
    runs). `requests` are k consecutive requests per prompt."""
    from pocketlm.classify.model import hidden_states, pad_batch
    from pocketlm.device import model_device
    from pocketlm.eval.likelihood import _autocast, model_context

    groups = [requests[i:i + k] for i in range(0, len(requests), k)]
    if any(len(cont) != 1 or ctx != g[0][0] for g in groups for ctx, cont in g) or not hasattr(model, "transformer"):
        return None
    max_len = model_context(model, context)
    prompts = [g[0][0][-max_len:] for g in groups]  # cut from the left, as the general path cuts
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = pad_batch([prompts[i] for i in rows], 0, device=device)
            with _autocast(device, precision):
                hidden = hidden_states(model, ids)
                last = hidden[torch.arange(len(rows), device=device), mask.sum(1) - 1]
                logits = model.lm_head(last)[..., : model.config.vocab_size]
            logprobs = logits.float().log_softmax(-1).cpu()
            for r, i in enumerate(rows):
                for j, (_, cont) in enumerate(groups[i]):
                    out[i * k + j] = float(logprobs[r, cont[0]])
    finally:
        model.train(was_training)
    return out


def evaluate_zero_shot(model, tokenizer, rows, probe: Probe, *, batch_size: int = 16, context: int | None = None,
                       precision: str | None = None) -> dict:
    """accuracy, accuracy_calibrated, majority_accuracy, macro_f1 and per-row details of a probe on
    labelled rows (pocketlm.classify.data.Row)."""
    from pocketlm.classify.data import label_ids
    from pocketlm.classify.metrics import classification_metrics
    from pocketlm.eval.multiple_choice import continuation_logprobs, encode_pair

    pair = rows[0].text_pair is not None
    _check_template(probe.template, pair)
    classes = probe_classes(probe, rows)
    labels = label_ids(rows, classes)
    words = class_words(probe, classes)
    prompts = [probe.template.format(text=r.text, text_pair=r.text_pair or "") for r in rows]
    prompts.append(probe.template.format(text="N/A", text_pair="N/A"))  # content-free, for calibration
    requests = [encode_pair(tokenizer, p, " " + w) for p in prompts for w in words]
    fast = single_token_logprobs(model, requests, len(words), batch_size=batch_size, context=context,
                                 precision=precision)
    scores = fast if fast is not None else continuation_logprobs(model, requests, batch_size=batch_size,
                                                                 context=context, precision=precision)
    k = len(words)
    table = [scores[i * k:(i + 1) * k] for i in range(len(prompts))]
    prior = table.pop()

    def argmax(values):
        return max(range(k), key=lambda j: (values[j], -j))

    preds = [argmax(s) for s in table]
    calibrated = [argmax([s[j] - prior[j] for j in range(k)]) for s in table]
    result = classification_metrics(labels, preds, classes)
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    return {
        "accuracy": result["accuracy"], "accuracy_calibrated": sum(p == y for p, y in zip(calibrated, labels)) / len(labels),
        "majority_accuracy": majority, "macro_f1": result["macro_f1"], "examples": len(rows),
        "template": probe.template, "verbalizers": dict(zip(map(str, classes), words)),
        "content_free_logprobs": dict(zip(words, prior)), "per_class": result["per_class"],
        "confusion_matrix": result["confusion_matrix"],
        "details": [{"line": r.line, "label": r.label, "pred": classes[p], "pred_calibrated": classes[c],
                     "logprobs": s} for r, p, c, s in zip(rows, preds, calibrated, table)],
    }
