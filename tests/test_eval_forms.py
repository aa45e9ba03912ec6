"""Form validators on the real texts in ../shared/data and on broken ones; readers; the registry."""

from __future__ import annotations

import json
import random

import pytest

from pocketlm.errors import UserError
from pocketlm.eval.forms import Form, FormResult, get_form, read_texts, register_form, validate_samples
from pocketlm.eval.forms.phonetics import line_syllables, rhyme_grade
from pocketlm.eval.forms.screenplay import parse_fountain, time_of_day
from pocketlm.eval.forms.sonnet import sonnet_lines

SONNET_18 = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
   So long as men can breathe or eyes can see,
   So long lives this, and this gives life to thee."""


@pytest.fixture(scope="module")
def sonnets(shared_data):
    form = get_form("sonnet")
    return (read_texts(shared_data / "sonnets" / "sonnets.txt", form),
            read_texts(shared_data / "sonnets" / "TRUE_sonnets_held_out_dev.txt", form))


# -- sonnets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,grade", [
    ("day", "away", "perfect"), ("love", "prove", "slant"), ("come", "doom", "slant"),
    ("evil", "devil", "slant"), ("die", "memory", "slant"), ("will", "will", "identical"),
    ("cat", "dog", "none"), ("thee", "posterity", "slant"), ("o'er", "before", "perfect"),
])
def test_rhyme_grades(a, b, grade):
    assert rhyme_grade(a, b) == grade


def test_syllables_of_iambic_lines():
    assert line_syllables("From fairest creatures we desire increase,") == 10
    assert line_syllables("Feed'st thy light's flame with self-substantial fuel,") == 10


def test_reader_splits_numbered_sonnets_and_drops_the_header(sonnets):
    train, held_out = sonnets
    assert len(train) == 131 and len(held_out) == 12
    assert train[0].startswith("From fairest creatures") and "Folger" not in train[0]
    assert held_out[0].startswith("Thine eyes I love")
    assert all(len(sonnet_lines(s)) == 14 for s in held_out)


def test_shakespeare_passes_and_the_irregular_sonnets_fail(sonnets):
    train, held_out = sonnets
    form = get_form("sonnet")
    report = validate_samples(form, train)
    assert report["pass_rate"] >= 0.95  # measured: 128 of 131
    failed = {s["index"] + 1 for s in report["samples"] if not s["passed"]}
    assert {99, 126} <= failed  # 99 has 15 lines, 126 is 12 lines of couplets
    assert "has 15 lines" in report["samples"][98]["problems"][0]
    assert validate_samples(form, held_out)["pass_rate"] == 1.0
    # A strict perfect-rhyme rule would reject most of them: the graded rhyme is what lets them pass.
    strict = sum(s["diagnostics"]["strict_rhyme"] for s in report["samples"])
    assert strict < 0.5 * len(train)


def test_broken_sonnets_fail(sonnets, shared_data):
    train, held_out = sonnets
    form = get_form("sonnet")
    rng = random.Random(0)
    shuffled = []
    for text in train + held_out:  # same words and meter, rhyme scheme destroyed
        lines = sonnet_lines(text)
        rng.shuffle(lines)
        shuffled.append("\n".join(lines))
    assert validate_samples(form, shuffled)["pass_rate"] <= 0.03  # measured: 0 of 143
    # Unrhymed blank verse from the plays, 14 lines at a time: right meter, no rhyme.
    verse = [x.strip() for x in (shared_data / "tinyshakespeare" / "input.txt").read_text().split("\n")[:3000]
             if x.strip() and not x.strip().endswith(":")]
    chunks = ["\n".join(verse[i:i + 14]) for i in range(0, 14 * 60, 14)]
    assert validate_samples(form, chunks)["pass_rate"] <= 0.03
    # The held-out prompts hold 3 lines of each sonnet.
    prompts = read_texts(shared_data / "sonnets" / "sonnets_held_out_dev.txt", form)
    assert len(prompts) == 12 and validate_samples(form, prompts)["passed"] == 0
    # Right rhymes, wrong meter; and one line looped.
    short = "\n".join(" ".join(line.split()[-2:]) for line in sonnet_lines(SONNET_18))
    result = form.validate(short)
    assert not result.passed and any("syllables" in p for p in result.problems)
    assert not form.validate("\n".join([sonnet_lines(SONNET_18)[0]] * 14)).passed


def test_sonnet_18_passes_with_diagnostics():
    result = get_form("sonnet").validate("18\n\n" + SONNET_18)
    assert result.passed, result.problems
    d = result.diagnostics
    assert d["lines"] == 14 and d["rhyming_pairs"] == 7 and len(d["syllables"]) == 14
    assert d["rhyme_pairs"][0] == {"lines": [1, 3], "words": ["day", "may"], "grade": "perfect"}


def test_plain_text_sonnets_separated_by_blank_lines_or_with_stanza_breaks(tmp_path):
    form = get_form("sonnet")
    lines = sonnet_lines(SONNET_18)
    stanzas = "\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:8]) + "\n\n" + "\n".join(lines[8:12]) + \
        "\n\n" + "\n".join(lines[12:])
    (tmp_path / "a.txt").write_text(stanzas + "\n\n" + stanzas + "\n")
    texts = read_texts(tmp_path / "a.txt", form)
    assert len(texts) == 2 and all(form.validate(t).passed for t in texts)
    (tmp_path / "b.txt").write_text(SONNET_18 + "\n\n" + SONNET_18 + "\n")
    assert len(read_texts(tmp_path / "b.txt", form)) == 2
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": SONNET_18}) + "\n")
    assert read_texts(tmp_path / "c.jsonl", form) == [SONNET_18]


# -- screenplays -------------------------------------------------------------------------------------

def test_real_screenplays(shared_data):
    form = get_form("screenplay")
    files = sorted((shared_data / "screenplays").glob("*.fountain"))
    assert len(files) == 5
    results = {f.name: form.validate(f.read_text()) for f in files}
    # The one failure is a work-in-progress draft that has no scene heading yet.
    assert [n for n, r in results.items() if not r.passed] == ["Cyber_Bob_epSithSuperInformalLanguage.fountain"]
    d = results["THE_LIBRARY_FREAK-OUT.fountain"].diagnostics
    assert d["scene_headings"] == 3 and d["title_page"] and d["parentheticals"] == 5 and d["transitions"] == 2
    assert {"CHALF", "NAR", "YOR", "CHARYA"} <= set(d["characters"])
    assert read_texts(shared_data / "screenplays", form) and len(read_texts(shared_data / "screenplays", form)) == 5


def test_fountain_elements_and_time_of_day():
    text = ("Title: Test\nAuthor: Me\n\nFADE IN:\n\nINT. KITCHEN - NIGHT\n\nBob enters.\n\nBOB\n(quietly)\n"
            "Hello there.\n\nALICE (V.O.)\nHi.\n\nCUT TO:\n\n.THE GARDEN\n\n> THE END <\n")
    kinds = [k for k, _ in parse_fountain(text)]
    assert kinds == ["title", "title", "transition", "heading", "action", "cue", "parenthetical", "dialogue",
                     "cue", "dialogue", "transition", "heading", "centered"]
    assert time_of_day("EXT. PARK--DAY") == "DAY"
    assert time_of_day("INT. BOB'S KITCHEN - MOMENTS LATER") == "MOMENTS LATER"
    assert time_of_day("INT. KITCHEN") is None
    result = get_form("screenplay").validate(text)
    assert not result.passed and "without a time of day" in result.problems[0]  # .THE GARDEN has none


def test_broken_screenplays_fail(shared_data):
    form = get_form("screenplay")
    good = (shared_data / "screenplays" / "Cyber_Bob_ep00001.fountain").read_text()
    no_headings = "\n".join(x for x in good.split("\n") if not x.startswith(("INT.", "EXT.")))
    assert "no scene heading" in form.validate(no_headings).problems[0]
    prose = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:2000].lower()
    assert not form.validate(prose).passed
    no_dialogue = "EXT. FIELD - DAY\n\nWind blows over the grass.\n"
    assert form.validate(no_dialogue).problems == [
        "no dialogue (an upper-case character cue followed by the spoken lines)"]


# -- greentext ---------------------------------------------------------------------------------------

def test_greentext_on_real_texts(shared_data):
    form = get_form("greentext")
    synthetic = read_texts(shared_data / "greentext" / "synthetic_sample_0D0XZhH2LxhW.json", form)
    assert len(synthetic) == 25 and validate_samples(form, synthetic)["pass_rate"] == 1.0
    db = json.loads((shared_data / "greentext" / "wholesomegreentext_ocr_db.json").read_text())
    verified = [r["verified"] for r in db.values() if r.get("verified")]
    strict = validate_samples(form, verified)
    # Measured: 189 of 344 pass the strict rule; the rest carry OCR line wraps without '>'.
    assert 0.5 < strict["pass_rate"] < 0.6
    fractions = [s["diagnostics"]["greentext_fraction"] for s in strict["samples"]]
    assert sum(f >= 0.8 for f in fractions) / len(fractions) > 0.8


def test_broken_greentext_fails_and_plain_text_splits_on_blank_lines(tmp_path):
    form = get_form("greentext")
    assert form.validate(">be me\n>write tests\n>they pass").passed
    bad = form.validate("be me\n>write tests")
    assert not bad.passed and bad.diagnostics["other_lines"] == [1]
    assert not form.validate("").passed and not form.validate(">\n>").passed
    (tmp_path / "g.txt").write_text(">be me\n>mfw\n\n>be you\n>tfw\n\nprose here\n")
    texts = read_texts(tmp_path / "g.txt", form)
    assert texts == [">be me\n>mfw", ">be you\n>tfw", "prose here"]
    assert validate_samples(form, texts)["pass_rate"] == pytest.approx(2 / 3)


# -- registry ----------------------------------------------------------------------------------------

def test_new_forms_plug_in_and_unknown_forms_are_user_errors():
    @register_form
    class ShoutForm(Form):
        name = "shout-test"

        def validate(self, text: str) -> FormResult:
            return FormResult(passed=text.isupper())

    assert validate_samples("shout-test", ["HEY", "hey"])["pass_rate"] == 0.5
    with pytest.raises(UserError, match="unknown form 'haiku'"):
        get_form("haiku")
