"""Corpus -> token shards + manifest (`pocketlm prepare`). The format is in ARCHITECTURE.md.

Two streaming passes over the source: the first counts documents (so the train/val split is an exact,
seeded choice of documents) and hashes the files; the second tokenizes chunks of document pieces,
in a background thread (tokenizers' encode_batch is multithreaded in Rust) or in worker processes,
and appends the ids to shards of at most `shard_tokens` tokens. Everything is written into a temporary
folder beside DIR that replaces DIR only when complete (manifest.json last): a prepare that fails, is
interrupted or killed never leaves DIR half-written, and a data set that was there stays intact.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from pocketlm.atomic import (
    atomic_write_json,
    check_output_dir,
    clean_stale_temporaries,
    disk_full_error,
    make_temp_dir,
    replace_dir,
)
from pocketlm.data.manifest import FORMAT, SPLITS, load_manifest  # noqa: F401 (load_manifest re-exported)
from pocketlm.data.sources import Corpus, Piece
from pocketlm.errors import UserError
from pocketlm.tokenizer import Tokenizer, load_tokenizer

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_MIN_VAL_TOKENS = 1025  # one window of the default 1024-token context, plus its shifted target
DEFAULT_WORKERS = 1  # measured on 2 cores: one process with encode_batch's Rust threads beats worker processes
PIECE_CHARS = 1 << 15  # long documents are tokenized in pieces of about this many characters...
CHUNK_CHARS = 1 << 20  # ...and pieces are handed to the tokenizer in batches of about this many
PROGRESS_BYTES = 16 << 20  # show a progress bar for sources larger than this
_SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")

# Text pairs cut the way sources.cut_point cuts. A tokenizer that encodes each pair like its
# concatenation (byte-level BPE does; a SentencePiece "prepend ▁" normalizer does not) can take long
# documents in pieces; any other gets whole documents.
_CUT_PROBES = [("Hello", " world"), ("end.", "\nNext line"), ("x", " 123"), ("Ünïcödé", " tëxt"),
               ("a", "\n'tis"), ("said", ' "no"'), ("tab\there", " and"), ("你好", " 世界"), ("<p>", " 42%")]


def pieces_are_exact(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.encode(a + b) == tokenizer.encode(a) + tokenizer.encode(b) for a, b in _CUT_PROBES)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# -- tokenizing: in a thread or in worker processes -----------------------------------------------------
_worker_backend: HFTokenizer | None = None


def _encode(backend: HFTokenizer, texts: list[str], dtype: str) -> list[tuple[np.ndarray, int]]:
    """Token ids and UTF-8 byte counts of each text."""
    encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    return [(np.asarray(e.ids, dtype=dtype), len(t.encode("utf-8"))) for e, t in zip(encodings, texts)]


def _worker_init(tokenizer_json: str) -> None:
    global _worker_backend
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism: one thread each
    _worker_backend = HFTokenizer.from_str(tokenizer_json)


def _worker_encode(texts: list[str], dtype: str) -> list[tuple[np.ndarray, int]]:
    assert _worker_backend is not None
    return _encode(_worker_backend, texts, dtype)


def _executor(tokenizer: Tokenizer, workers: int) -> tuple[Executor, Callable[[list[str], str], Future]]:
    if workers <= 1:  # encode_batch releases the GIL: reading the next chunk overlaps tokenizing this one
        pool: Executor = ThreadPoolExecutor(1)
        return pool, lambda texts, dtype: pool.submit(_encode, tokenizer.backend, texts, dtype)
    # spawn, not fork: a forked child of a process whose Rust thread pool already ran may deadlock.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(tokenizer.backend.to_str(),))
    return pool, lambda texts, dtype: pool.submit(_worker_encode, texts, dtype)


# -- shards ---------------------------------------------------------------------------------------------
class ShardWriter:
    """Appends token ids to DIR/<split>_NNNNNN.bin, starting a new file every shard_tokens tokens."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.tokens = self.documents = self.bytes = 0

    def _next_shard(self) -> None:
        self._close_file()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self.file = open(self.out / name, "wb")  # closed in _close_file
        self.shards.append({"file": name, "tokens": 0})

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            take = min(len(ids), self.shard_tokens - self.shards[-1]["tokens"])
            self.file.write(ids[:take].astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += take
            self.tokens += take
            ids = ids[take:]

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())  # on disk before the manifest that names it
            self.file.close()
            self.file = None

    def close(self) -> dict:
        self._close_file()
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


# -- the split ------------------------------------------------------------------------------------------
def _plan_split(documents: int, chars: int, val_fraction: float | None, val_documents: int | None,
                seed: int) -> tuple[str, set[int], int | None]:
    """(mode, validation document indices, character cut). One document is split by characters."""
    if val_documents is not None:
        if documents == 1:
            raise UserError("--val-documents needs a corpus of several documents, and this one is a single "
                            "document: use --val-fraction (the last part of the text becomes validation)")
        if not 1 <= val_documents < documents:
            raise UserError(f"--val-documents {val_documents} must be between 1 and {documents - 1}: the corpus "
                            f"has {documents} documents and training needs at least one")
        count = val_documents
    else:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        if not 0 <= fraction < 1:
            raise UserError(f"--val-fraction {fraction} must be at least 0 and below 1")
        if fraction == 0:
            return "documents", set(), None
        if documents == 1:
            return "characters", set(), int(chars * (1 - fraction))
        count = min(documents - 1, max(1, round(fraction * documents)))
    return "documents", set(random.Random(seed).sample(range(documents), count)), None


def _assign(pieces: Iterable[Piece], mode: str, val: set[int], cut: int | None) -> Iterator[tuple[str, str, bool]]:
    """(split, text, end_of_document) for every piece."""
    if mode == "documents":
        index = 0
        for text, end in pieces:
            yield ("val" if index in val else "train"), text, end
            index += end
        return
    assert cut is not None
    offset, split = 0, "train"
    for text, end in pieces:
        if split == "train" and offset + len(text) > cut:
            local = cut - offset
            newline = text.find("\n", local)  # validation starts at a line start where there is one
            local = newline + 1 if newline >= 0 else local
            yield "train", text[:local], True
            split, text = "val", text[local:]
        offset += len(text)
        yield split, text, end


def _chunks(items: Iterable[tuple[str, str, bool]], chunk_chars: int) -> Iterator[list[tuple[str, str, bool]]]:
    chunk, size = [], 0
    for item in items:
        chunk.append(item)
        size += len(item[1])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# What a prepared data set folder holds; --out may hold nothing else (it is replaced as a whole).
_DATA_SET_FILES = {"manifest.json", "tokenizer.json", "tokenizer_config.json"}


def check_output_folder(out: Path) -> None:
    """Refuse an --out that is a file or holds files that are not a prepared data set's, before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the data set")
    if out.is_dir():
        try:
            names = [p.name for p in out.iterdir()]
        except OSError as exc:
            raise UserError(f"cannot read --out {out}: {exc.strerror or exc}") from None
        others = sorted(n for n in names if n not in _DATA_SET_FILES and not _SHARD_NAME.match(n))
        if others:
            raise UserError(f"--out {out} holds files that are not a prepared data set ({', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}): give a new or empty folder")
    check_output_dir(out, "--out")  # the new data set is built beside it, then renamed into its place


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _check_options(val_fraction: float | None, val_documents: int | None, shard_tokens: int, workers: int,
                   min_val_tokens: int) -> None:
    if val_fraction is not None and val_documents is not None:
        raise UserError("give --val-fraction or --val-documents, not both")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be at least 1 (got {shard_tokens})")
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    if min_val_tokens < 0:
        raise UserError(f"--min-val-tokens must be 0 or more (got {min_val_tokens})")


def _count_documents(corpus: Corpus, cuttable: int | None, show: bool) -> tuple[int, int]:
    """Pass 1: (documents, characters of the first document: all a one-document corpus has)."""
    documents = chars = 0
    with tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc="reading", disable=not show,
              file=sys.stderr, leave=False) as bar:
        for piece in corpus.pieces(cuttable):
            documents += piece.end
            chars += len(piece.text) if documents <= 1 else 0
            bar.update(corpus.bytes_read[0] - bar.n)
    if documents == 0:
        raise UserError(f"no text in {corpus.source}: {len(corpus.files)} file(s) read and every document is "
                        "empty (check the file, --text-field/--column, or the delimiter)")
    return documents, chars


def _tokenize_into(tmp: Path, corpus: Corpus, tok: Tokenizer, dtype: np.dtype, items: Iterable[tuple[str, str, bool]],
                   *, shard_tokens: int, workers: int, chunk_chars: int, show: bool) -> dict:
    """Pass 2: tokenize (split, text, end) items into shards under tmp; returns {split: its manifest entry}."""
    writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    eot = np.array([tok.eos_id], dtype=dtype)
    pool, submit = _executor(tok, workers)
    pending: collections.deque[tuple[list, Future]] = collections.deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            chunk, future = pending.popleft()
            for (split, _, end), (ids, nbytes) in zip(chunk, future.result()):
                writer = writers[split]
                writer.write(ids)
                writer.bytes += nbytes
                if end:
                    writer.write(eot)
                    writer.documents += 1
            bar.update(corpus.bytes_read[0] - bar.n)

    try:
        with pool, tqdm(total=corpus.total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                        disable=not show, file=sys.stderr) as bar:
            for chunk in _chunks(items, chunk_chars):
                pending.append((chunk, submit([text for _, text, _ in chunk], dtype.str)))
                drain(keep=2 * workers)  # bounded: at most a few chunks in memory
            drain(keep=0)
    finally:
        splits = {s: w.close() for s, w in writers.items()}  # closed (and synced) whatever happened
    return splits


def prepare(source: str | Path, out: str | Path, *, tokenizer: str | Path | Tokenizer = "gpt2",
            val_fraction: float | None = None, val_documents: int | None = None, seed: int = 1337,
            delimiter: str | None = None, delimiter_regex: str | None = None, text_field: str | None = None,
            column: str | None = None, workers: int = DEFAULT_WORKERS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            min_val_tokens: int = DEFAULT_MIN_VAL_TOKENS, progress: bool | None = None,
            log: Callable[[str], None] = _stderr, piece_chars: int = PIECE_CHARS,
            chunk_chars: int = CHUNK_CHARS) -> dict:
    """Tokenize SOURCE into DIR (= out): shards, tokenizer files, manifest.json. Returns the manifest."""
    _check_options(val_fraction, val_documents, shard_tokens, workers, min_val_tokens)
    out = Path(out)
    check_output_folder(out)
    corpus = Corpus(source, delimiter=delimiter, delimiter_regex=delimiter_regex, text_field=text_field,
                    column=column)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise UserError(f"tokenizer {tok.name!r} has no end-of-text token to separate documents with: "
                        "choose another --tokenizer")
    dtype = token_dtype(tok.vocab_size)
    cuttable = piece_chars if pieces_are_exact(tok) else None
    show = corpus.total_bytes > PROGRESS_BYTES if progress is None else progress
    documents, chars = _count_documents(corpus, cuttable, show)
    hashes = [f.record() for f in corpus.files]
    mode, val, cut = _plan_split(documents, chars, val_fraction, val_documents, seed)

    # Pass 2: tokenize and write, into a temporary folder beside --out that replaces it only when complete:
    # a prepare that fails or is interrupted leaves --out as it was (a killed one leaves the temporary
    # folder, removed by the next prepare).
    clean_stale_temporaries(out.parent, out.name)
    tmp = make_temp_dir(out)
    try:
        splits = _tokenize_into(tmp, corpus, tok, dtype, _assign(corpus.pieces(cuttable), mode, val, cut),
                                shard_tokens=shard_tokens, workers=workers, chunk_chars=chunk_chars, show=show)
        if [f.record() for f in corpus.files] != hashes:
            raise UserError(f"{corpus.source} changed while it was being prepared: run `pocketlm prepare` again")
        if (val or cut is not None) and splits["val"]["tokens"] < min_val_tokens:
            raise UserError(
                f"the validation split has {splits['val']['tokens']} tokens, fewer than --min-val-tokens "
                f"{min_val_tokens} (one context window + 1): raise --val-fraction or --val-documents, "
                "lower --min-val-tokens, or add data")
        tok.save(tmp)
        manifest = {
            "format": FORMAT, "tokenizer": tok.describe(), "dtype": dtype.name, "eot_id": tok.eos_id,
            "splits": splits, "sources": hashes, "replaced_characters": corpus.replaced_characters, "seed": seed,
            "val_fraction": None if val_documents is not None else
            (DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction),
            "val_documents": val_documents, "delimiter": delimiter, "delimiter_regex": delimiter_regex,
            "split_by": mode, "documents": documents, "min_val_tokens": min_val_tokens,
            "source": corpus.describe(),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, out)  # renames; the old data set is removed only afterwards
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(sys.exc_info()[1], out)
        if full is not None:
            raise full from None
        raise
    if corpus.replaced_characters:
        log(f"warning: {corpus.replaced_characters} undecodable byte sequence(s) in {corpus.source} were "
            "replaced by U+FFFD (is the source UTF-8?)")
    if corpus.ignored_characters:
        log(f"warning: {corpus.ignored_characters} visible character(s) outside {delimiter} were skipped")
    return manifest


# -- reading a prepared data set ------------------------------------------------------------------------
def split_memmaps(directory: str | Path, split: str, manifest: dict | None = None) -> list[np.memmap]:
    """The shards of one split as read-only memory maps (an empty split has none)."""
    manifest = manifest or load_manifest(directory)
    if split not in manifest["splits"]:
        raise UserError(f"no split {split!r} in {directory}: it has {', '.join(manifest['splits'])}")
    return [np.memmap(Path(directory) / s["file"], dtype=manifest["dtype"], mode="r", shape=(s["tokens"],))
            for s in manifest["splits"][split]["shards"] if s["tokens"]]
