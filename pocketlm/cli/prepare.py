"""`pocketlm prepare SOURCE --out DIR`: tokenize a corpus into token shards + manifest.json."""

from __future__ import annotations

import argparse
import time

from pocketlm.data.prepare import (
    DEFAULT_MIN_VAL_TOKENS,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_WORKERS,
)
from pocketlm.data.sources import BUILTIN_CORPORA

DESCRIPTION = f"""\
Tokenize SOURCE into DIR: token shards (DIR/train_000000.bin, DIR/val_000000.bin, ...), the tokenizer,
and DIR/manifest.json (written last). Every document is followed by the end-of-text token.

SOURCE is one of:
  a text file          one document (any extension but .jsonl/.ndjson/.csv/.tsv), unless --delimiter or
                       --delimiter-regex cuts it into several
  a folder             every .txt/.md file in it (recursive, sorted by path) is one document
  a .jsonl file        one document per line, from the field --text-field (default "text")
  a .csv/.tsv file     one document per row, from the column --column (default "text"); a .csv may be
                       comma-, tab- or semicolon-separated
  a built-in corpus    {", ".join(f"{k} ({v.about})" for k, v in BUILTIN_CORPORA.items())}

The validation split is a seeded random choice of whole documents (--val-fraction or --val-documents).
A corpus of ONE document (e.g. a single text file such as tinyshakespeare's input.txt) is split by text
instead: the last --val-fraction of its characters, from the next line start, is the validation split.
Bytes that are not UTF-8 are replaced by U+FFFD and counted; line endings become "\\n".
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenize a corpus into token shards for training",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="text file, folder, .jsonl, .csv, or built-in corpus name")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the prepared data set")
    p.add_argument("--tokenizer", default="gpt2", metavar="NAME_OR_PATH",
                   help="built-in tokenizer name, tokenizer folder/json, or model (default: gpt2)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=None, metavar="F",
                       help=f"share of documents for validation (default: {DEFAULT_VAL_FRACTION}; 0: none); "
                            "of the characters for a one-document corpus")
    split.add_argument("--val-documents", type=int, default=None, metavar="K",
                       help="exactly K documents for validation")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (default: 1337)")
    delim = p.add_mutually_exclusive_group()
    delim.add_argument("--delimiter", default=None, metavar="'<TAG>...</TAG>'|SEP",
                       help="documents are the text between the two tags around '...'; "
                            "without '...', a separator string between documents")
    delim.add_argument("--delimiter-regex", default=None, metavar="REGEX",
                       help="a regular expression (Python syntax) whose matches separate documents")
    p.add_argument("--text-field", default=None, metavar="NAME", help="JSONL field with the text (default: text)")
    p.add_argument("--column", default=None, metavar="NAME", help="CSV column with the text (default: text)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                   help=f"tokenizer processes; 1 tokenizes in this process on all cores (default: {DEFAULT_WORKERS})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"at most N tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--min-val-tokens", type=int, default=DEFAULT_MIN_VAL_TOKENS, metavar="N",
                   help="fail if the validation split has fewer tokens: one context window + 1 "
                        f"(default: {DEFAULT_MIN_VAL_TOKENS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _shards(n: int) -> str:
    return f"{n} shard{'s' if n != 1 else ''}"


def run(args: argparse.Namespace) -> None:
    from pocketlm.data.prepare import prepare

    start = time.perf_counter()
    manifest = prepare(
        args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        val_documents=args.val_documents, seed=args.seed, delimiter=args.delimiter,
        delimiter_regex=args.delimiter_regex, text_field=args.text_field, column=args.column,
        workers=args.workers, shard_tokens=args.shard_tokens, min_val_tokens=args.min_val_tokens,
        progress=False if args.no_progress else None,
    )
    seconds = time.perf_counter() - start
    splits = manifest["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    size = sum(s["bytes"] for s in manifest["sources"])
    print(f"prepared {manifest['documents']:,} documents ({size / 1e6:.1f} MB) from {args.source} with "
          f"{manifest['tokenizer']['name']} in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    for name, info in splits.items():
        print(f"  {name:<5} {info['documents']:>9,} documents {info['tokens']:>13,} tokens "
              f"in {_shards(len(info['shards']))}")
    print(f"  -> {args.out}/manifest.json")
