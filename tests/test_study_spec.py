"""Study files: parsing, grid expansion, and the one-line errors (with key and line) for bad input."""

from __future__ import annotations

import textwrap

import pytest

from pocketlm.errors import UserError
from pocketlm.study.grid import expand
from pocketlm.study.spec import builtin_names, load_study

BASE = """\
study: t
data:
  source: {corpus}
base:
  max_steps: 4
  lr: 1e-3
"""


@pytest.fixture
def write(tmp_path, tiny_text):
    def _write(body: str, name: str = "s.yaml"):
        path = tmp_path / name
        path.write_text(BASE.format(corpus=tiny_text) + textwrap.dedent(body))
        return path
    return _write


def test_grid_groups_exclusions_dedupe_and_repeats(write):
    path = write("""\
        axes:
          method: [full, lora]
          rank: [4, 8]
          targets: [attn, attn+mlp]
        exclude:
          - {rank: 8, targets: attn}
        repeats: 2
        measures: [val_loss]
        """)
    study = load_study(str(path))
    assert study.base["lr"] == 1e-3  # YAML reads 1e-3 as text; the knob is a number
    cells = expand(study)
    ids = [c.id for c in cells]
    # full ignores rank/targets: one full cell (not four); lora: 4 combinations - 1 excluded = 3; x2 repeats
    assert ids == ["method-full_rep1", "method-full_rep2",
                   "method-lora_rank-4_targets-attn_rep1", "method-lora_rank-4_targets-attn_rep2",
                   "method-lora_rank-4_targets-attn+mlp_rep1", "method-lora_rank-4_targets-attn+mlp_rep2",
                   "method-lora_rank-8_targets-attn+mlp_rep1", "method-lora_rank-8_targets-attn+mlp_rep2"]
    assert [c.seed for c in cells[:2]] == [1337, 1338]
    assert cells[2].knobs["rank"] == 4 and cells[2].varied == {"method": "lora", "rank": 4, "targets": "attn"}


def test_group_moves_knobs_together_and_cells_start_from_cells(write):
    path = write("""\
        axes:
          stage:
            - {name: lora, method: lora, base: "cell:scratch", rank: 2}
            - {name: scratch, method: pretrain, arch: gpt2-tiny}
        measures: [val_loss]
        """)
    cells = expand(load_study(str(path)))
    assert [c.id for c in cells] == ["scratch", "lora"]  # a cell runs after the cell it starts from
    assert cells[1].depends == ["scratch"] and cells[1].knobs["rank"] == 2


def test_quick_section_merges_over_the_study(write):
    path = write("""\
        axes:
          method: [lora]
          rank: [1, 2, 4]
        measures: [val_loss]
        quick:
          base: {max_steps: 2}
          axes: {rank: [1]}
        """)
    full, quick = load_study(str(path)), load_study(str(path), quick=True)
    assert len(expand(full)) == 3 and len(expand(quick)) == 1
    assert quick.base["max_steps"] == 2 and quick.base["lr"] == 1e-3
    assert full.fingerprint() != quick.fingerprint()


@pytest.mark.parametrize("body, message", [
    ("axes:\n  rnak: [1, 2]\nmeasures: [val_loss]\n", r"line 8, axes\.rnak: unknown knob 'rnak'"),
    ("axes:\n  rank: [1, 2]\nmeasures: [val_loss, perplexity_of_doom]\n",
     r"line 9, measures\[1\]: unknown measure 'perplexity_of_doom'"),
    ("axes:\n  method: [lora]\n  rank: [4, -1]\nmeasures: [val_loss]\n",
     r"line 9, axes\.rank\[1\]: cell rank-1: LoRA rank must be a positive integer"),
    ("axes:\n  precision: [fp32, fp7]\nmeasures: [val_loss]\n", r"line 8, axes\.precision\[1\].*fp7"),
    ("axes:\n  rank: [4, many]\nmeasures: [val_loss]\n", r"line 8, axes\.rank\[1\]: rank must be an integer"),
    ("axes:\n  rank: [4]\nexclude:\n  - {rank: 4}\nmeasures: [val_loss]\n", r"line 7, axes: .*no cell"),
    ("axes:\n  method: [full]\n  quantize: [int8, int3]\nmeasures: [val_loss]\n",
     r"line 9, axes\.quantize\[1\]: .*quantize 'int3' is not a format"),
    ("axes:\n  method: [full]\n  qat: [nf4]\nmeasures: [val_loss]\n", r"line 9, axes\.qat\[0\]: .*--qat 'nf4'"),
    ("axes:\n  rank: [1]\nmeasures:\n  - zero_shot: {probe: vibes}\n", r"line 10, measures\[0\]: zero_shot: probe"),
    ("axes:\n  rank: [4]\n", r"measures: list what to measure"),
    ("axes:\n  stage:\n    - {method: lora, base: 'cell:nowhere'}\nmeasures: [val_loss]\n",
     r"line 9, axes\.stage\[0\]\.base: cell:nowhere names no cell"),
    ("axes: {rank: [4]}\nmeasures: [val_loss]\nbogus: 1\n", r"line 9: unknown key 'bogus'"),
    ("axes:\n  rank: [4\nmeasures: [val_loss]\n", r"line \d+: not valid YAML"),
])
def test_bad_study_files_fail_in_one_line_naming_key_and_line(write, body, message):
    path = write(body)
    with pytest.raises(UserError, match=message) as info:
        expand(load_study(str(path)))
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_data_names_the_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("study: t\ndata:\n  source: /no/such/corpus.txt\naxes: {rank: [1]}\nmeasures: [val_loss]\n")
    with pytest.raises(UserError, match=r"line 3, data\.source: /no/such/corpus.txt does not exist"):
        load_study(str(path))


def test_builtin_studies_parse_and_expand_full_and_quick(shared_data, monkeypatch):
    monkeypatch.setenv("POCKETLM_SHARED_DATA", str(shared_data))
    names = builtin_names()
    assert {"seed-000-screenplay", "seed-001-sonnet-knobs", "seed-002-greentext", "seed-003-fantasy",
            "seed-004-shakespeare"} <= set(names)
    for name in names:
        full, quick = expand(load_study(name)), expand(load_study(name, quick=True))
        assert quick and len(quick) <= len(full)
        assert all(c.knobs["max_steps"] <= 40 for c in quick if c.knobs["method"] != "none")


def test_only_selects_cells_and_brings_their_starting_cells(write):
    from pocketlm.study.runner import plan

    path = write("""\
        axes:
          stage:
            - {name: scratch, method: pretrain}
            - {name: mid, method: full, base: "cell:scratch"}
            - {name: top, method: lora, base: "cell:mid"}
            - {name: other, method: pretrain, lr: 3e-4}
        measures: [val_loss]
        """)
    study = load_study(str(path))
    assert [c.id for c in plan(study, ["top"])] == ["scratch", "mid", "top"]
    assert [c.id for c in plan(study, ["oth*"])] == ["other"]
    with pytest.raises(UserError, match="--only nothing matches no cell"):
        plan(study, ["nothing"])


def test_repeats_of_a_cell_start_from_the_same_repeat_of_its_base(write):
    path = write("""\
        axes:
          stage:
            - {name: scratch, method: pretrain, arch: gpt2-tiny}
            - {name: lora, method: lora, base: "cell:scratch", rank: 2}
        repeats: 2
        measures: [val_loss]
        """)
    cells = {c.id: c for c in expand(load_study(str(path)))}
    for r in (1, 2):  # the folder the cell loads (knobs["base"]) is the one it waits for (depends)
        lora = cells[f"lora_rep{r}"]
        assert lora.depends == [f"scratch_rep{r}"] and lora.knobs["base"] == f"cell:scratch_rep{r}"
        assert lora.varied["base"] == "cell:scratch"  # the results row still groups the repeats together


def test_forgetting_is_measured_against_where_the_chain_of_cells_started(write):
    from pocketlm.study.grid import forgetting_reference

    path = write("""\
        axes:
          stage:
            - {name: full, method: full}
            - {name: int8, method: none, base: "cell:full", quantize: int8}
            - {name: scratch, method: pretrain, arch: gpt2-tiny}
            - {name: tuned, method: full, base: "cell:scratch"}
            - {name: top, method: lora, base: "cell:tuned", rank: 2}
        measures: [val_loss]
        """)
    cells = expand(load_study(str(path)))
    ref = {c.id: forgetting_reference(c, cells) for c in cells}
    base = next(c for c in cells if c.id == "full").knobs["base"]
    assert ref == {"full": base, "int8": base, "scratch": None, "tuned": "cell:scratch", "top": "cell:scratch"}
