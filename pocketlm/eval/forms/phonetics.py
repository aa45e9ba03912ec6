"""Pronunciations, syllables and graded rhyme, from the CMU Pronouncing Dictionary (`pronouncing`).

Rhyme is graded, not yes/no, because a strict perfect-rhyme test fails about half of Shakespeare's
sonnets: Early Modern English rhymes such as love/prove, come/doom, evil/devil or die/memory are
perfect rhymes no longer. Grades, strongest first:

- "perfect":   the sounds from the last stressed vowel to the end are equal (day/away).
- "identical": the same word (Shakespeare rhymes Will/will).
- "slant":     consonance (same consonants after the stressed vowel: love/prove, come/doom, evil/devil),
               assonance (same stressed vowel: time/wise), or a rhyme on the final, unstressed syllable
               (thee/posterity; and the historical -y/-ie rhyme die/memory).
- "eye":       spelled alike, sounding different (the spelling rime, e.g. -ove, -ough).
- "none".

Words missing from the dictionary get pronunciations derived from archaic forms (feed'st, belov'd,
beauty's, canst); failing that, syllables are counted by vowel groups and rhyme by spelling only.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pronouncing

RHYME_GRADES = ("perfect", "identical", "slant", "eye", "none")

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*'?|'[A-Za-z]+")
_VOWEL_LETTERS = re.compile(r"[aeiouy]+")


def words(line: str) -> list[str]:
    """Words of a line, lowercased, apostrophes kept (o'er, feed'st, 'tis); dashes split words."""
    return [w.lower() for w in _WORD.findall(line.replace("--", " "))]


def final_word(line: str) -> str | None:
    found = words(line)
    return found[-1].strip("'") if found else None


def _is_vowel(phone: str) -> bool:
    return phone[-1].isdigit()


def _lookup(word: str) -> list[list[str]]:
    return [p.split() for p in pronouncing.phones_for_word(word)]


@lru_cache(maxsize=65536)
def _pronunciations(word: str) -> tuple[tuple[str, ...], ...]:
    word = word.lower()
    found = _lookup(word) or _lookup(word.strip("'"))
    if not found:
        found = _derive(word.strip("'"))
    return tuple(tuple(p) for p in found)


def pronunciations(word: str) -> list[list[str]]:
    """CMU phone lists for `word` (empty when neither the dictionary nor a derived form knows it)."""
    return [list(p) for p in _pronunciations(word)]


# Poetic elisions the dictionary lacks (o'er = over without its v).
_ELISIONS = {
    "o'er": ["AO1", "R"], "e'er": ["EH1", "R"], "e'en": ["IY1", "N"], "ta'en": ["T", "EY1", "N"],
    "'gainst": ["G", "EH1", "N", "S", "T"], "stol'n": ["S", "T", "OW1", "L", "N"], "'twixt": ["T", "W", "IH1", "K", "S", "T"],
}
# Prefixes whose stem the dictionary knows (resurvey, uprear, inhearse, unbred): the stem keeps its stress.
_PREFIXES = {
    "over": ["OW2", "V", "ER0"], "with": ["W", "IH0", "DH"], "fore": ["F", "AO0", "R"], "out": ["AW2", "T"], "dis": ["D", "IH0", "S"],
    "mis": ["M", "IH0", "S"], "un": ["AH0", "N"], "re": ["R", "IY0"], "up": ["AH0", "P"], "in": ["IH0", "N"],
    "be": ["B", "IH0"], "en": ["EH0", "N"], "for": ["F", "AO0", "R"],
}


def _derive(word: str) -> list[list[str]]:
    """Pronunciations of archaic or inflected forms the dictionary lacks, built from their stems."""
    if word in _ELISIONS or "'" + word in _ELISIONS:
        return [_ELISIONS.get(word) or _ELISIONS["'" + word]]
    # Possessives: beauty's, others', eyes'.
    for suffix, extra in (("'s", ["Z"]), ("s'", ["Z"]), ("'", [])):
        if word.endswith(suffix) and len(word) > len(suffix):
            stem = _lookup(word[: -len(suffix)])
            if stem:
                return [p + extra for p in stem]
    # Second person -st / -est: feed'st, mak'st, know'st, canst, wouldst (the ending adds no syllable
    # after an apostrophe; "-est" without one adds a syllable: lovest = LOVE + IH0 S T).
    if word.endswith("'st"):
        stem = word[:-3]
        for base in (stem, stem + "e"):
            if _lookup(base):
                return [p + ["S", "T"] for p in _lookup(base)]
    if word.endswith("st") and not word.endswith("est"):
        stem = word[:-2]
        for base in (stem, stem[:-1] if stem.endswith("d") else stem):
            if len(base) > 1 and _lookup(base):
                return [p + ["S", "T"] for p in _lookup(base)]
    if word.endswith("est") and _lookup(word[:-3] + "e"):
        return [p + ["IH0", "S", "T"] for p in _lookup(word[:-3] + "e")]
    if word.endswith("eth"):
        for base in (word[:-3], word[:-3] + "e"):
            if _lookup(base):
                return [p + ["IH0", "TH"] for p in _lookup(base)]
    # Elided past tense: belov'd, despis'd (the shortest pronunciation of the -ed form).
    if word.endswith("'d"):
        full = _lookup(word[:-2] + "ed") or _lookup(word[:-2] + "d")
        if full:
            fewest = min(sum(map(_is_vowel, p)) for p in full)
            return [p for p in full if sum(map(_is_vowel, p)) == fewest]
    for prefix, phones in _PREFIXES.items():
        if word.startswith(prefix) and len(word) - len(prefix) >= 3:
            stem = _lookup(word[len(prefix):])
            if stem:
                return [phones + p for p in stem]
    return []


def _guess_syllables(word: str) -> int:
    """Vowel groups of the spelling, less a silent final -e: for words no dictionary knows."""
    letters = re.sub(r"[^a-z]", "", word.lower())
    if not letters:
        return 0
    n = len(_VOWEL_LETTERS.findall(letters))
    if n > 1 and letters.endswith("e") and not letters.endswith(("le", "ee", "ie", "ye")):
        n -= 1
    return max(1, n)


def _verse_syllables(phones) -> int:
    """Vowels, with a diphthong + unstressed -er (fire, desire, hour, power) as one syllable, as verse
    usually scans it."""
    n = sum(map(_is_vowel, phones))
    for a, b in zip(phones, phones[1:]):
        if a[:-1] in ("AY", "AW", "OY") and a[-1].isdigit() and b == "ER0":
            n -= 1
    return n


def syllables(word: str) -> int:
    """Syllables of a word: the fewest the dictionary allows (verse elides), else a spelling guess."""
    if word.endswith("'") and len(word) > 1 and not word.endswith("s'"):
        return 0  # th', i' : elided into the next word
    found = _pronunciations(word)
    if found:
        return min(_verse_syllables(p) for p in found)
    return _guess_syllables(word)


def line_syllables(line: str) -> int:
    return sum(syllables(w) for w in words(line))


def _strip(phones) -> tuple[str, ...]:
    return tuple(p.rstrip("012") for p in phones)


def _rhyme_tail(phones: list[str]) -> list[str]:
    """From the last stressed vowel (primary or secondary) to the end; the last vowel if none is stressed."""
    for i in range(len(phones) - 1, -1, -1):
        if phones[i][-1] in "12":
            return phones[i:]
    for i in range(len(phones) - 1, -1, -1):
        if _is_vowel(phones[i]):
            return phones[i:]
    return phones


def _last_syllable(phones: list[str]) -> list[str]:
    for i in range(len(phones) - 1, -1, -1):
        if _is_vowel(phones[i]):
            return phones[i:]
    return phones


def _spelling_rime(word: str) -> str:
    """The spelling from the last vowel group on, a silent final e included (love -> ove, doom -> oom)."""
    letters = re.sub(r"[^a-z]", "", word.lower())
    trimmed = letters[:-1] if letters.endswith("e") and len(letters) > 2 else letters
    groups = list(_VOWEL_LETTERS.finditer(trimmed))
    return letters[groups[-1].start():] if groups else letters


def _grade_phones(a: list[str], b: list[str], word_a: str, word_b: str) -> str:
    ta, tb = _strip(_rhyme_tail(a)), _strip(_rhyme_tail(b))
    if ta == tb:
        return "perfect"
    va, vb = ta[0], tb[0]
    coda_a, coda_b = ta[1:], tb[1:]
    if coda_a and coda_a == coda_b:
        return "slant"  # consonance: love/prove, come/doom, evil/devil
    if va == vb:
        return "slant"  # assonance: time/wise
    # Rhyme on the final syllable when one word stresses it and the other does not: thee/posterity.
    la, lb = _strip(_last_syllable(a)), _strip(_last_syllable(b))
    if la == lb:
        return "slant"
    # Historical: -y in polysyllables sounded like -ie (die/memory, eyes/qualities).
    def historical(syl: tuple[str, ...], word: str) -> tuple[str, ...]:
        if syl and syl[0] == "IY" and re.search(r"[^aeiou]y(?:'?s)?$|ies$", word):
            return ("AY",) + syl[1:]
        return syl
    if historical(la, word_a) == historical(lb, word_b):
        return "slant"
    return "none"


@lru_cache(maxsize=65536)
def rhyme_grade(word_a: str, word_b: str) -> str:
    """How well two line-final words rhyme: one of RHYME_GRADES (best over all pronunciations)."""
    a, b = word_a.lower().strip("'"), word_b.lower().strip("'")
    if not a or not b:
        return "none"
    if a == b:
        return "identical"
    best = "none"
    for pa in _pronunciations(a):
        for pb in _pronunciations(b):
            grade = _grade_phones(list(pa), list(pb), a, b)
            if RHYME_GRADES.index(grade) < RHYME_GRADES.index(best):
                best = grade
    if best == "none":
        ra, rb = _spelling_rime(a), _spelling_rime(b)
        if ra == rb and re.search(r"[aeiouy]", ra):
            best = "eye"
    return best
