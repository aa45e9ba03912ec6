"""synth's filters, applied in a fixed order; a sample is kept when it passes every one.

Order (each optional): form validator -> length bounds -> regex -> exact dedupe -> near-duplicate dedupe
(MinHash LSH, `datasketch`) -> dedupe against an existing corpus -> perplexity band by a reference model.
The first filter a sample fails names the reason it was dropped (`"<filter>: <detail>"`), so the report
counts each dropped sample once. Dedupe indexes hold kept samples only, in the order they were kept: a
rerun rebuilds them from the output file and continues with the same state.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from pocketlm.errors import UserError

FILTER_ORDER = ("validate", "length", "regex", "exact-dedupe", "near-dedupe", "corpus-dedupe", "perplexity")
DEDUPE_MODES = ("none", "exact", "minhash")


def normalize(text: str) -> str:
    """Text as dedupe compares it: Unicode NFKC, lower case, runs of whitespace as one space, trimmed."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(text: str, size: int = 5) -> set[str]:
    """Character `size`-grams of the normalised text (a short text is its own single shingle)."""
    norm = normalize(text)
    if len(norm) <= size:
        return {norm}
    return {norm[i : i + size] for i in range(len(norm) - size + 1)}


class NearDuplicates:
    """MinHash signatures in an LSH index: `find(text)` -> the key of a similar indexed text, or None."""

    def __init__(self, threshold: float, num_perm: int = 128) -> None:
        from datasketch import MinHash, MinHashLSH

        if not 0 < threshold < 1:
            raise UserError(f"--dedupe-threshold must be in (0, 1), got {threshold}: e.g. 0.8 (Jaccard similarity)")
        self._minhash = MinHash
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.count = 0

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        return m

    def find(self, text: str, signature=None) -> str | None:
        hits = self.lsh.query(signature if signature is not None else self.signature(text))
        return min(hits) if hits else None

    def add(self, key: str, text: str, signature=None) -> None:
        if key in self.lsh:
            return
        self.lsh.insert(key, signature if signature is not None else self.signature(text))
        self.count += 1


@dataclass
class FilterSettings:
    validate: str | None = None  # a form name: sonnet | screenplay | greentext
    min_chars: int | None = None
    max_chars: int | None = None
    regex: str | None = None  # must match somewhere (re.search)
    exclude_regex: str | None = None  # must not match
    dedupe: str = "none"  # none | exact | minhash (minhash also drops exact duplicates)
    dedupe_threshold: float = 0.8
    dedupe_against: list[str] = field(default_factory=list)  # corpora the samples must not copy
    perplexity_model: str | None = None
    perplexity_min: float | None = None
    perplexity_max: float | None = None

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], "none")}


class FilterChain:
    """`check(text) -> reason or None`; `keep(id, text)` after a sample is written as kept."""

    def __init__(self, settings: FilterSettings, perplexity: Callable[[str], float] | None = None) -> None:
        self.settings = s = settings
        self.form = None
        if s.validate:
            from pocketlm.eval.forms import get_form

            self.form = get_form(s.validate)  # raises UserError naming the forms there are
        if s.dedupe not in DEDUPE_MODES:
            raise UserError(f"unknown --dedupe {s.dedupe!r}: choose one of {', '.join(DEDUPE_MODES)}")
        for name in ("min_chars", "max_chars"):
            if getattr(s, name) is not None and getattr(s, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
        if s.min_chars is not None and s.max_chars is not None and s.min_chars > s.max_chars:
            raise UserError(f"--min-chars ({s.min_chars}) is above --max-chars ({s.max_chars})")
        self.regex = _compile(s.regex, "--regex")
        self.exclude = _compile(s.exclude_regex, "--exclude-regex")
        self.seen: dict[str, str] = {}  # normalised text -> id of the kept sample
        self.near = NearDuplicates(s.dedupe_threshold) if s.dedupe == "minhash" else None
        self.corpus_exact: dict[str, int] = {}
        self.corpus_near: NearDuplicates | None = None
        self.perplexity = perplexity
        if (s.perplexity_min is not None or s.perplexity_max is not None) and perplexity is None \
                and s.perplexity_model is None:
            raise UserError("--perplexity-min/--perplexity-max need --perplexity-model SOURCE to score samples")

    def load_corpora(self, texts_by_corpus: dict[str, list[str]]) -> None:
        """Index the corpora synthetic samples must not copy: exact and (with minhash) near copies."""
        if self.settings.dedupe == "minhash" or self.near is not None:
            self.corpus_near = NearDuplicates(self.settings.dedupe_threshold)
        for name, texts in texts_by_corpus.items():
            for i, text in enumerate(texts):
                self.corpus_exact.setdefault(normalize(text), i)
                if self.corpus_near is not None:
                    self.corpus_near.add(f"{name}#{i}", text)

    def check(self, text: str) -> str | None:
        """The first filter `text` fails, as "filter: detail"; None when it passes them all."""
        s = self.settings
        if self.form is not None:
            result = self.form.validate(text)
            if not result.passed:
                return f"validate: {s.validate}: {'; '.join(result.problems) or 'failed'}"
        n = len(text.strip())
        if s.min_chars is not None and n < s.min_chars:
            return f"length: {n} characters < --min-chars {s.min_chars}"
        if s.max_chars is not None and n > s.max_chars:
            return f"length: {n} characters > --max-chars {s.max_chars}"
        if self.regex is not None and not self.regex.search(text):
            return f"regex: does not match {s.regex!r}"
        if self.exclude is not None and self.exclude.search(text):
            return f"regex: matches --exclude-regex {s.exclude_regex!r}"
        norm = normalize(text)
        if s.dedupe != "none" and norm in self.seen:
            return f"exact-dedupe: same text as {self.seen[norm]}"
        if self.near is not None:
            hit = self.near.find(text)
            if hit is not None:
                return f"near-dedupe: near duplicate of {hit}"
        if norm in self.corpus_exact:
            return "corpus-dedupe: copies a text of --dedupe-against"
        if self.corpus_near is not None:
            hit = self.corpus_near.find(text)
            if hit is not None:
                return f"corpus-dedupe: near duplicate of {hit}"
        if self.perplexity is not None:
            ppl = self.perplexity(text)
            if s.perplexity_min is not None and ppl < s.perplexity_min:
                return f"perplexity: {ppl:.2f} < --perplexity-min {s.perplexity_min:g}"
            if s.perplexity_max is not None and ppl > s.perplexity_max:
                return f"perplexity: {ppl:.2f} > --perplexity-max {s.perplexity_max:g}"
        return None

    def keep(self, record_id: str, text: str) -> None:
        """Add a kept sample to the dedupe indexes."""
        self.seen.setdefault(normalize(text), record_id)
        if self.near is not None:
            self.near.add(record_id, text)


def reason_filter(reason: str) -> str:
    """The filter's name from a record's reason ("validate: ..." -> "validate")."""
    return reason.split(":", 1)[0]


def _compile(pattern: str | None, flag: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"{flag} {pattern!r} is not a valid regular expression: {exc}") from None
