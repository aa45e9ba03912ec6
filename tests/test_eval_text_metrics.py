"""chrF/BLEU against sacrebleu; distinct-n and repeated n-grams on hand-counted examples."""

from __future__ import annotations

import pytest
import sacrebleu

from pocketlm.eval.text_metrics import (
    bleu,
    chrf,
    degeneration_metrics,
    distinct_n,
    repeated_ngram_rate,
    sentence_chrf,
)

HYPS = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate",
        "Rough winds do shake the darling buds of Maytime"]
REFS = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
        "Rough winds do shake the darling buds of May,"]


def test_chrf_equals_sacrebleu_corpus_chrf():
    assert chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert chrf(HYPS[:1], REFS[:1]) == pytest.approx(100.0)
    assert chrf(["zzz qqq"], ["Shall I compare thee"]) < 5
    # Corpus chrF pools statistics: it is not the mean of sentence scores.
    mean = sum(sentence_chrf(h, r) for h, r in zip(HYPS, REFS)) / 3
    assert chrf(HYPS, REFS) != pytest.approx(mean, abs=1e-9)


def test_bleu_equals_sacrebleu_corpus_bleu():
    assert bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        chrf(HYPS, REFS[:2])


def test_distinct_n_by_hand():
    texts = ["the cat the cat", "a dog"]
    # unigrams: the cat the cat a dog -> 4 distinct of 6; bigrams: (the cat)(cat the)(the cat)(a dog) -> 3 of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n([""], 2) == 0.0
    assert distinct_n(["Hello, hello!"], 1) == pytest.approx(3 / 4)  # lowercased; punctuation are tokens


def test_repeated_ngram_rate_by_hand():
    looping = "a b c d a b c d a b c d"  # 9 four-grams, 4 distinct -> 5/9 repeat
    fresh = "one two three four five"  # 2 four-grams, both new
    assert repeated_ngram_rate([looping], 4) == pytest.approx(5 / 9)
    assert repeated_ngram_rate([fresh], 4) == 0.0
    assert repeated_ngram_rate([looping, fresh, "too short"], 4) == pytest.approx((5 / 9 + 0) / 2)
    metrics = degeneration_metrics([looping])
    assert metrics["distinct_1"] == pytest.approx(4 / 12) and metrics["repeated_4gram_rate"] == pytest.approx(5 / 9)
