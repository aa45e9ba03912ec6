"""Labelled text for classification: read CSV/TSV/JSONL rows, map labels to classes, split, encode.

The CS224N files (ids-sst-*.csv, ids-cfimdb-*.csv, quora-dev.csv) are read as they are: tab-separated
despite the .csv name (the delimiter is taken from the header line), with `csv.DictReader` as the
CS224N loaders read them. Rows the data gets wrong (too few or too many fields, an empty text or label;
quora-dev.csv has two) are skipped and counted, never fatal. Mistakes the user can fix (a column that
does not exist, labels that are neither integers nor strings, one class, an empty file) are UserErrors.

Labels are integers (also written `1.0`, as Quora's `is_duplicate` is) or strings; the classes are the
sorted distinct labels, and class i is the i-th of them (0..K-1 integer labels keep their numbers).
"""

from __future__ import annotations

import csv
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from pocketlm.errors import UserError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long reviews are one field


@dataclass
class Row:
    text: str
    label: int | str  # the label as the file spells it (integers normalised: "1.0" -> 1)
    text_pair: str | None = None
    line: int = 0  # where it came from (1-based data row), for predictions files


@dataclass
class LabelledData:
    """Rows of one file, plus what was skipped and why."""

    path: str
    rows: list[Row]
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def label_counts(self) -> dict:
        return dict(sorted(Counter(r.label for r in self.rows).items(), key=lambda kv: str(kv[0])))


def _delimiter(path: Path, header: str) -> str:
    if path.suffix.lower() == ".tsv" or "\t" in header:
        return "\t"
    return ","


def _label_value(raw, path: Path, where: str) -> int | str | None:
    """An integer or a string label; None for a missing one (the row is skipped)."""
    if raw is None:
        return None
    if isinstance(raw, bool) or isinstance(raw, (list, dict)):
        raise UserError(f"{path}{where}: label {raw!r} is neither an integer nor a string: classification "
                        "needs integer or string labels")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise UserError(f"{path}{where}: label {raw!r} is not an integer: classification needs integer or "
                            "string labels (bin real-valued targets into classes first)")
        return int(raw)
    if isinstance(raw, int):
        return raw
    text = str(raw).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    if number != number or number in (float("inf"), float("-inf")):
        return text
    if not number.is_integer():
        raise UserError(f"{path}{where}: label {text!r} is not an integer: classification needs integer or "
                        "string labels (bin real-valued targets into classes first)")
    return int(number)


def _check_columns(path: Path, available: list[str], wanted: dict[str, str | None]) -> None:
    for flag, name in wanted.items():
        if name is not None and name not in available:
            shown = ", ".join(repr(c) for c in available if c) or "none"
            raise UserError(f"{path} has no column {name!r} for {flag}: its columns are {shown}")


def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        header = f.readline()
        if not header.strip():
            raise UserError(f"{path} is empty: give a CSV/TSV file with a header row, or JSONL")
        f.seek(0)
        reader = csv.DictReader(f, delimiter=_delimiter(path, header))
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _read_jsonl(path: Path) -> tuple[list[str], list[dict | None]]:
    rows: list[dict | None] = []
    keys: dict[str, None] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                rows.append(None)  # malformed: counted, skipped
                continue
            if isinstance(row, dict):
                keys.update(dict.fromkeys(row))
                rows.append(row)
            else:
                rows.append(None)
    return list(keys), rows


def read_labelled(path: str | Path, text_column: str, label_column: str,
                  text_pair_column: str | None = None, *, need_labels: bool = True) -> LabelledData:
    """Rows with a text (and pair) and a label from a CSV, TSV or JSONL file.

    need_labels=False reads files without labels (CS224N's *-test-student.csv): every label is None.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a CSV, TSV or JSONL file of labelled texts")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty: give a CSV/TSV file with a header row, or JSONL")
    jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    columns, raw_rows = _read_jsonl(path) if jsonl else _read_table(path)
    if not raw_rows:
        raise UserError(f"{path} has no data rows")
    wanted = {"--text-column": text_column, "--text-pair-column": text_pair_column}
    if need_labels:
        wanted["--label-column"] = label_column
    _check_columns(path, columns, wanted)

    rows: list[Row] = []
    skipped: Counter = Counter()
    for n, raw in enumerate(raw_rows, start=1):
        if raw is None:
            skipped["malformed"] += 1
            continue
        if None in raw or any(v is None for v in raw.values()):  # csv: too many / too few fields
            skipped["wrong number of fields"] += 1
            continue
        text = raw.get(text_column)
        pair = raw.get(text_pair_column) if text_pair_column else None
        if not isinstance(text, str) or not text.strip() or (text_pair_column and
                                                              (not isinstance(pair, str) or not pair.strip())):
            skipped["empty or missing text"] += 1
            continue
        label = _label_value(raw.get(label_column), path, f" row {n}") if need_labels else None
        if need_labels and label is None:
            skipped["missing label"] += 1
            continue
        rows.append(Row(text=text, label=label, text_pair=pair, line=n))
    if not rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items())
        raise UserError(f"{path} has no usable rows ({reasons}): check --text-column/--label-column")
    return LabelledData(str(path), rows, skipped)


def class_labels(rows: list[Row], path: str = "the data") -> list:
    """The sorted distinct labels: integers numerically, strings alphabetically (never mixed)."""
    labels = {r.label for r in rows}
    kinds = {type(x) for x in labels}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes integer and string labels ({sorted(map(str, labels))[:6]}): use one kind")
    if len(labels) < 2:
        only = next(iter(labels)) if labels else None
        raise UserError(f"{path} has a single class ({only!r}): classification needs at least two labels")
    return sorted(labels)


def label_ids(rows: list[Row], classes: list, path: str = "the data") -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(r.label) for r in rows if r.label not in index})
    if unknown:
        raise UserError(f"{path} has labels {unknown[:5]} the classifier was not trained on (it knows "
                        f"{[str(c) for c in classes]}): evaluate on data with the training labels")
    return [index[r.label] for r in rows]


def split_rows(rows: list[Row], seed: int, val_fraction: float, test_fraction: float = 0.0
               ) -> tuple[list[Row], list[Row], list[Row]]:
    """A seeded (train, val, test) split of one file's rows: the same seed gives the same split."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise UserError(f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in "
                        "[0, 1) and leave rows to train on (e.g. 0.1 and 0.1)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * val_fraction))
    n_test = round(len(rows) * test_fraction)
    if len(rows) - n_val - n_test < 2:
        raise UserError(f"only {len(rows)} rows: too few to split into train and validation sets")
    val = [rows[i] for i in order[:n_val]]
    test = [rows[i] for i in order[n_val:n_val + n_test]]
    train = [rows[i] for i in order[n_val + n_test:]]
    return train, val, test


VAL_FRACTION, TEST_FRACTION = 0.1, 0.1  # finetune's defaults for a file without --val-data


def select_holdout(rows: list[Row], part: str | None, seed: int, val_fraction: float = VAL_FRACTION,
                   test_fraction: float = TEST_FRACTION) -> tuple[list[Row], str | None]:
    """(rows of one part of the file's seeded split, a sentence saying so); all rows when part is None."""
    if part is None:
        return rows, None
    parts = dict(zip(("train", "val", "test"), split_rows(rows, seed, val_fraction, test_fraction)))
    if part not in parts:
        raise UserError(f"unknown split part {part!r}: choose train, val or test")
    note = (f"using the {part} part ({len(parts[part]):,} of {len(rows):,} rows) of a seeded split "
            f"(seed {seed}: {1 - val_fraction - test_fraction:.0%} train / {val_fraction:.0%} val / "
            f"{test_fraction:.0%} test)")
    return parts[part], note


def write_rows(path: str | Path, rows: list[Row], text_column: str, label_column: str,
               text_pair_column: str | None = None) -> None:
    """JSONL with the file's own column names (+ `line`): a split part that read_labelled, `eval --classify`
    and `eval --zero-shot` read with the same columns as the original file."""
    from pocketlm.atomic import atomic_write_text

    lines = []
    for r in rows:
        item = {text_column: r.text, **({text_pair_column: r.text_pair} if text_pair_column else {}),
                label_column: r.label, "line": r.line}
        lines.append(json.dumps(item, ensure_ascii=False))
    atomic_write_text(path, "".join(x + "\n" for x in lines))


# -- encoding -----------------------------------------------------------------------------------------
@dataclass
class Encoded:
    ids: list[list[int]]
    truncated: int  # rows cut to max_length


def swapped(rows: list[Row]) -> list[Row]:
    """Each pair in the other order, (b, a) for (a, b): --swap-pairs trains on and predicts with both."""
    return [replace(r, text=r.text_pair, text_pair=r.text) for r in rows]


def separator_id(tokenizer) -> int:
    """The token between the two texts of a pair: end-of-text (a token every pocketlm tokenizer knows)."""
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    if sep is None:
        raise UserError("the tokenizer has no end-of-text or start token to separate text pairs with: "
                        "use a tokenizer that has one, or join the texts into one column")
    return sep


def encode_rows(tokenizer, rows: list[Row], max_length: int) -> Encoded:
    """Token ids of each row: text, or text + separator + pair, cut to max_length tokens.

    A single text keeps its first max_length tokens; a pair is cut longest-first (each half keeps its
    beginning), so both texts stay represented.
    """
    if max_length < 3:
        raise UserError(f"--max-length must be at least 3 tokens, got {max_length}")
    firsts = tokenizer.encode_batch([r.text for r in rows])
    pairs = tokenizer.encode_batch([r.text_pair for r in rows]) if rows and rows[0].text_pair is not None else None
    out, truncated = [], 0
    sep = separator_id(tokenizer) if pairs is not None else None
    for i, a in enumerate(firsts):
        if pairs is None:
            if len(a) > max_length:
                truncated += 1
                a = a[:max_length]
            out.append(a or [sep_or_eos(tokenizer)])
            continue
        b = pairs[i]
        budget = max_length - 1
        if len(a) + len(b) > budget:
            truncated += 1
            # longest-first, as tokenizers' truncation: the shorter text stays whole if it fits in half
            first_share = budget - budget // 2 if len(a) >= len(b) else budget // 2
            keep_a = min(len(a), max(budget - len(b), first_share))
            a, b = a[:keep_a], b[: budget - keep_a]
        out.append(a + [sep] + b)
    return Encoded(out, truncated)


def sep_or_eos(tokenizer) -> int:
    """A stand-in token for a text that encodes to nothing (whitespace-only texts are skipped earlier)."""
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0
