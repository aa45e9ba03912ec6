"""Metrics on generated text: chrF and BLEU (sacrebleu), distinct-n and repeated n-grams.

- chrF / BLEU: sacrebleu's corpus scores (0-100) with its default settings, so the numbers are the ones
  `sacrebleu` prints and CS224N's sonnet evaluation (`CHRF().corpus_score`) reports.
- distinct-n (Li et al., 2016): distinct n-grams / all n-grams over the whole set of generations;
  low values mean the model says the same things again and again.
- repeated n-gram rate (seq-rep-n, Welleck et al., 2019): within one generation, the share of its
  n-grams that repeat an n-gram seen earlier in it (1 - unique/total), averaged over generations;
  high values mean a generation loops.
Words for the n-gram metrics are lowercased words and punctuation marks (`\\w+|[^\\w\\s]`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF

_TOKEN = re.compile(r"\w+|[^\w\s]")


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu CHRF(), character 6-grams, beta 2), 0-100."""
    _check_pairs(hypotheses, references)
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return float(CHRF().sentence_score(hypothesis, [reference]).score)


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu BLEU(), 13a tokenization), 0-100."""
    _check_pairs(hypotheses, references)
    return float(BLEU().corpus_score(list(hypotheses), [list(references)]).score)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(items: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams across all `texts` (0 when there are no n-grams)."""
    grams = [g for t in texts for g in ngrams(tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean over texts of the share of a text's n-grams that occurred earlier in the same text.

    Texts shorter than n words have no n-grams and are left out; 0 when none has any."""
    rates = []
    for t in texts:
        grams = ngrams(tokens(t), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def degeneration_metrics(texts: Sequence[str]) -> dict[str, float]:
    """distinct_1, distinct_2 and repeated_4gram_rate of a set of generations."""
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_4gram_rate": repeated_ngram_rate(texts, 4),
    }
