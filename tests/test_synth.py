"""pocketlm synth: prompts, filters, the fsynced store, resume, and the command's errors (local tiny teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketlm.errors import UserError
from pocketlm.synth import FilterSettings, Sampling, SynthOptions, synthesize
from pocketlm.synth.filters import FilterChain, normalize
from pocketlm.synth.prompts import load_prompts
from pocketlm.synth.store import RecordStore


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    """A gpt2-tiny model folder: random weights, so its samples are varied junk text."""
    from pocketlm.io import save_model
    from pocketlm.model import GPT
    from pocketlm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    return save_model(GPT.from_name("gpt2-tiny"), load_tokenizer("gpt2"), tmp_path_factory.mktemp("t") / "teacher")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- prompts -----------------------------------------------------------------------------------------

def test_prompt_list_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    src = load_prompts(tmp_path / "p.txt")
    assert [src.prompt(i, 0)[0] for i in range(3)] == ["first", "second", "first"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": ">be me\n>"}) + "\n" + json.dumps("plain") + "\n")
    assert load_prompts(tmp_path / "p.jsonl").prompts == [">be me\n>", "plain"]


def test_template_variables_fewshot_and_determinism(tmp_path):
    (tmp_path / "topics.txt").write_text("cats\ndogs\n")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f">example {i}"}) + "\n" for i in range(5)))
    (tmp_path / "t.yaml").write_text(
        "template: \"About {topic} ({mood}) {not a var}:\\n{examples}\\n>\"\n"
        "variables:\n  topic: topics.txt\n  mood: [happy, sad]\n"
        "examples:\n  corpus: corpus.jsonl\n  k: 2\n  separator: \"\\n---\\n\"\n")
    src = load_prompts(tmp_path / "t.yaml")
    prompt, variables = src.prompt(3, seed=7)
    assert prompt == src.prompt(3, seed=7)[0]  # a rerun renders the same prompt
    assert variables["topic"] in ("cats", "dogs") and variables["mood"] in ("happy", "sad")
    assert "{not a var}" in prompt and prompt.count(">example") == 2 and "\n---\n" in prompt
    assert len({src.prompt(i, 7)[0] for i in range(20)}) > 1


def test_template_with_an_unknown_variable_is_a_user_error(tmp_path):
    (tmp_path / "t.yaml").write_text("template: 'a poem about {topic} in {place}'\nvariables:\n  topic: [sea]\n")
    with pytest.raises(UserError, match=r"unknown variable \{place\}.*defined: topic"):
        load_prompts(tmp_path / "t.yaml")


# -- filters -----------------------------------------------------------------------------------------

def test_filters_in_order_with_reasons():
    chain = FilterChain(FilterSettings(validate="greentext", min_chars=10, max_chars=60, regex="cat",
                                       exclude_regex="dog", dedupe="exact"))
    assert chain.check("no arrow here").startswith("validate: greentext")
    assert chain.check(">cat").startswith("length:")
    assert chain.check(">be me\n>" + "x" * 80).startswith("length:")
    assert chain.check(">be me\n>no feline").startswith("regex: does not match")
    assert chain.check(">be me\n>cat and dog").startswith("regex: matches --exclude-regex")
    assert chain.check(">be me\n>a cat") is None
    chain.keep("id1", ">be me\n>a cat")
    assert chain.check(">BE  me\n>a   cat ") == "exact-dedupe: same text as id1"  # normalised text


def test_minhash_near_dedupe_and_corpus_dedupe():
    story = ">be me\n>walk to the store on a sunny afternoon\n>buy some milk and a loaf of bread\n>go home happy"
    chain = FilterChain(FilterSettings(dedupe="minhash", dedupe_threshold=0.7))
    chain.load_corpora({"heldout": [">mfw the eval set\n>gets copied word for word by the teacher model"]})
    assert chain.check(story) is None
    chain.keep("a", story)
    assert chain.check(story.replace("sunny", "rainy")).startswith("near-dedupe: near duplicate of a")
    assert chain.check(">tfw a completely different story\n>about trains and stations") is None
    assert chain.check(">mfw the eval set\n>gets copied word for word by the teacher model!").startswith(
        "corpus-dedupe")
    exact_only = FilterChain(FilterSettings(dedupe="exact"))
    exact_only.load_corpora({"c": ["Some Text"]})
    assert exact_only.check("some   text") == "corpus-dedupe: copies a text of --dedupe-against"


def test_perplexity_band(tiny_teacher, tmp_path, one_thread):
    chain = FilterChain(FilterSettings(perplexity_min=5, perplexity_max=50), perplexity=lambda text: len(text))
    assert chain.check("abc") == "perplexity: 3.00 < --perplexity-min 5"
    assert chain.check("x" * 60) == "perplexity: 60.00 > --perplexity-max 50"
    assert chain.check("x" * 20) is None
    with pytest.raises(UserError, match="need --perplexity-model"):
        FilterChain(FilterSettings(perplexity_max=10))
    # A real reference model: a random gpt2-tiny finds every text about as surprising as its vocabulary.
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    report = synthesize(options(tiny_teacher, prompts, tmp_path / "out.jsonl", 3, filters=FilterSettings(
        perplexity_model=str(tiny_teacher), perplexity_max=100.0)))
    assert report["dropped"] == {"perplexity": 3}
    reasons = [r["reasons"][0] for r in read_records(tmp_path / "out.jsonl")]
    assert all(r.startswith("perplexity: ") and float(r.split()[1]) > 1000 for r in reasons)


def test_unknown_validator_and_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown form 'haiku'"):
        FilterChain(FilterSettings(validate="haiku"))
    with pytest.raises(UserError, match="not a valid regular expression"):
        FilterChain(FilterSettings(regex="("))
    with pytest.raises(UserError, match="--min-chars"):
        FilterChain(FilterSettings(min_chars=10, max_chars=5))
    assert normalize("  A\u00a0b\n\tC ") == "a b c"


# -- the store ---------------------------------------------------------------------------------------

def test_store_drops_a_torn_last_line_and_locks(tmp_path):
    path = tmp_path / "out.jsonl"
    with RecordStore(path) as store:
        store.append({"id": "a", "text": "x", "kept": True})
        store.append({"id": "b", "text": "y", "kept": False})
        with pytest.raises(UserError, match="another `pocketlm synth` is writing"):
            RecordStore(path).__enter__()
    with path.open("a") as f:
        f.write('{"id": "c", "te')  # a kill in the middle of a write
    with RecordStore(path) as store:
        assert store.dropped_partial_line and [r["id"] for r in store.records] == ["a", "b"]
        store.append({"id": "c", "text": "z", "kept": True})
    assert [r["id"] for r in read_records(path)] == ["a", "b", "c"]


# -- synthesize with a local teacher -----------------------------------------------------------------

def options(teacher, prompts, out, samples, **kw) -> SynthOptions:
    return SynthOptions(teacher=str(teacher), prompts=str(prompts), out=str(out), samples=samples,
                        sampling=Sampling(max_new_tokens=kw.pop("max_new_tokens", 8)), progress=False,
                        device="cpu", **kw)


def test_synth_writes_records_resumes_and_reports(tiny_teacher, tmp_path, one_thread):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nThe cat\n")
    out = tmp_path / "out.jsonl"
    report = synthesize(options(tiny_teacher, prompts, out, 4, filters=FilterSettings(min_chars=20)))
    first = read_records(out)
    assert len(first) == 4 and report["records"] == 4 and report["this_run"]["generated"] == 4
    assert {"text", "id", "kept", "reasons", "prompt", "teacher", "sampling", "seed"} <= set(first[0])
    assert [r["prompt"] for r in first] == ["Once upon a time", "The cat"] * 2
    # A longer run of the same command continues: the first 4 records are kept as they are.
    report = synthesize(options(tiny_teacher, prompts, out, 7, filters=FilterSettings(min_chars=20)))
    records = read_records(out)
    assert records[:4] == first and len(records) == 7 and len({r["id"] for r in records}) == 7
    assert report["this_run"]["generated"] == 3 and report["requested"] == 7
    assert report["kept"] + sum(report["dropped"].values()) == 7
    assert report["kept"] == sum(r["kept"] for r in records)
    saved = json.loads((tmp_path / "out.report.json").read_text())
    assert saved["records"] == 7 and saved["this_run"]["completion_tokens"] > 0
    # Rerunning the finished command generates nothing; other settings are refused.
    assert synthesize(options(tiny_teacher, prompts, out, 7, filters=FilterSettings(min_chars=20)))[
        "this_run"]["generated"] == 0
    with pytest.raises(UserError, match="records from other settings"):
        synthesize(options(tiny_teacher, prompts, out, 7, max_new_tokens=9))
    assert read_records(out) == records  # nothing written before is lost


def test_dropped_records_are_not_data_for_prepare(tmp_path):
    from pocketlm.data.sources import Corpus

    path = tmp_path / "synth.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "kept text", "kept": True}) + "\n"
                    + json.dumps({"id": "b", "text": "dropped text", "kept": False}) + "\n")
    texts = "".join(piece.text for piece in Corpus(path, text_field="text").pieces(None))
    assert "kept text" in texts and "dropped text" not in texts
