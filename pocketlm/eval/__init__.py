"""Evaluation: what `pocketlm eval` computes, as a library.

- api.py              evaluate(SOURCE, text=..., baseline=..., ...): the whole command as one call
- likelihood.py       loss, perplexity, bits per byte of a text or a prepared split (sliding windows)
- multiple_choice.py  HellaSwag-style multiple choice (acc, acc_norm as lm-evaluation-harness)
- text_metrics.py     chrF / BLEU (sacrebleu), distinct-n, repeated n-gram rate
- generation_eval.py  complete prompts, score against references; sonnet prompt builder
- forms/              form validators (sonnet, screenplay, greentext) and their registry
- forgetting.py       base vs adapted model on the same general-ability probes
- during_training.py  the quick generation metrics the training loop logs
- report.py           JSON report and terminal table

Names are imported lazily, so `import pocketlm.eval` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "api",
    "evaluate_text": "likelihood", "evaluate_split": "likelihood", "score_tokens": "likelihood",
    "sliding_windows": "likelihood", "LikelihoodResult": "likelihood",
    "evaluate_multiple_choice": "multiple_choice", "read_multiple_choice": "multiple_choice",
    "chrf": "text_metrics", "bleu": "text_metrics", "distinct_n": "text_metrics",
    "repeated_ngram_rate": "text_metrics",
    "evaluate_generation": "generation_eval", "sonnet_prompt_pairs": "generation_eval",
    "get_form": "forms", "validate_samples": "forms", "read_texts": "forms", "register_form": "forms",
    "compare": "forgetting", "run_probes": "forgetting",
    "evaluate_during_training": "during_training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pocketlm.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pocketlm.eval' has no attribute {name!r}")
