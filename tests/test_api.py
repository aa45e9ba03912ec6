"""The library calls behind the commands (`import pocketlm`), optional TensorBoard / W&B logging, and the
generate command's output lines."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pocketlm
from pocketlm.recipe import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(model="gpt2-tiny", batch_tokens=128, micro_batch=4, context=32, eval_every=2, eval_batches=1,
             log_every=1, warmup_steps=1, lr=3e-3, device="cpu", precision="fp32", max_steps=2)


def test_pretrain_load_and_export_from_python(tiny_data, tmp_path):
    summary = pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), **SMALL), log=lambda _m: None)
    assert summary["steps"] == 2 and summary["method"] == "pretrain"
    model, tokenizer = pocketlm.load_model(tmp_path / "run")
    assert model.config.name == "gpt2-tiny" and tokenizer.name == "gpt2"
    out = pocketlm.export(tmp_path / "run", tmp_path / "exported")
    again, _ = pocketlm.load_model(out)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert pocketlm.load_tokenizer(out).identity == tokenizer.identity
    with pytest.raises(AttributeError):
        pocketlm.no_such_call  # noqa: B018


def test_logging_is_off_by_default_and_tensorboard_writes_events(tiny_data, tmp_path):
    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "plain"), **SMALL), log=lambda _m: None)
    assert not (tmp_path / "plain" / "tensorboard").exists() and not (tmp_path / "plain" / "wandb").exists()
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "tb"), tensorboard=True, **SMALL),
                      log=lambda _m: None)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train_loss")]
    logged = [json.loads(x)["train_loss"] for x in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(logged) and "val_loss" in events.Tags()["scalars"]


def test_wandb_logs_offline_through_its_library(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "wb"), wandb_project="pocketlm-test",
                                  **SMALL), log=lambda _m: None)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_generate_ends_its_output_and_its_speed_line_with_newlines(tiny_data, tmp_path):
    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), **SMALL), log=lambda _m: None)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "POCKETLM_ALLOCATOR": "glibc"}
    out = subprocess.run([sys.executable, "-m", "pocketlm", "generate", str(tmp_path / "run"), "--prompt", "ROMEO:",
                          "--max-new-tokens", "5", "--device", "cpu"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n")
    speed = [line for line in out.stderr.splitlines(keepends=True) if "tokens/s" in line]
    assert len(speed) == 1 and speed[0].endswith("\n")


# -- every command is one library call, importable from `pocketlm` ---------------------------------------
class _Called(Exception):
    """Raised by a stand-in for a library call: what the command passed it."""


# (public name, a command line, what the call must receive: positional args, then keyword args)
COMMANDS = [
    ("prepare", ["prepare", "shakespeare", "--out", "D", "--seed", "7"], (("shakespeare", "D"), {"seed": 7})),
    ("pretrain", ["pretrain", "--model", "gpt2-tiny", "--data", "D", "--out", "R", "--max-steps", "3"], None),
    ("finetune", ["finetune", "--base", "smollm2-135m", "--data", "D", "--method", "lora", "--out", "R",
                  "--lr-search", "1e-4,1e-3"], (None, {"lr_search": [1e-4, 1e-3]})),
    ("generate", ["generate", "S", "--prompt", "P", "--temperature", "0", "--num-samples", "2"],
     (("S",), {"temperature": 0.0, "num_samples": 2})),
    ("evaluate", ["eval", "S", "--text", "T", "--baseline", "B", "--json", "O"],
     (("S",), {"baseline": "B", "text": Path("T"), "json_out": Path("O")})),
    ("export", ["export", "S", "--out", "O", "--dtype", "bf16"], (("S", "O"), {"dtype": "bf16"})),
    ("merge", ["merge", "R", "--out", "O", "--base", "B"], (("R", "O"), {"base": "B"})),
    ("quantize", ["quantize", "S", "--format", "int4", "--out", "O"], (("S", "int4", "O"), {})),
    ("synthesize", ["synth", "--teacher", "T", "--prompts", "P", "--samples", "3", "--out", "O.jsonl"], None),
    ("list_models", ["models", "--json"], ((), {})),
    ("run_study", ["study", "run", "seed-001-sonnet-knobs", "--quick", "--out", "O", "--threads", "1"],
     (None, {"threads": 1})),
]


@pytest.mark.parametrize("name,argv,expected", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_each_command_is_one_public_library_call(name, argv, expected, monkeypatch, request):
    from pocketlm.cli import main

    if name == "run_study":  # the study's files must exist (they are not read)
        monkeypatch.setenv("POCKETLM_SHARED_DATA", str(request.getfixturevalue("shared_data")))

    public = getattr(pocketlm, name)
    assert callable(public) and name in pocketlm.__doc__
    module = importlib.import_module(pocketlm._EXPORTS[name])
    attr = pocketlm._CALLS.get(module.__name__, name)  # a module that is its own call (pocketlm.generate)
    assert public is (module if module.__name__ in pocketlm._CALLS else getattr(module, attr))

    def stand_in(*args, **kwargs):
        raise _Called(args, kwargs)

    monkeypatch.setattr(module, attr, stand_in)
    with pytest.raises(_Called) as called:
        main(argv)
    if public is module:
        with pytest.raises(_Called):
            public("anything")  # pocketlm.generate(...) reaches the same function the command calls
    args, kwargs = called.value.args
    if name in ("pretrain", "finetune"):
        cfg = args[0]
        assert isinstance(cfg, TrainConfig) and cfg.data == "D" and cfg.out == "R"
    if name == "generate":  # the prompt is read (from --prompt, a file or stdin) once the settings are checked
        assert args[1]() == "P"
    if name == "run_study":
        assert args[0].name == "seed-001-sonnet-knobs" and str(args[1]) == "O"
    if name == "synthesize":
        assert args[0].teacher == "T" and args[0].samples == 3 and args[0].out == "O.jsonl"
    if expected is not None:
        want_args, want_kwargs = expected
        if want_args is not None:
            assert tuple(str(a) for a in args[: len(want_args)]) == want_args
        assert {k: kwargs[k] for k in want_kwargs} == want_kwargs


def test_evaluate_and_generate_from_python_match_the_commands(tiny_data, tmp_path, capsys):
    """A notebook's pocketlm.evaluate / pocketlm.generate give what `pocketlm eval` / `generate` give."""
    from pocketlm.cli import main

    pocketlm.pretrain(TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), **SMALL), log=lambda _m: None)
    text = tmp_path / "held.txt"
    text.write_text("ROMEO: What light through yonder window breaks?\n" * 8)
    report = pocketlm.evaluate(tmp_path / "run", text=text, baseline=str(tmp_path / "run"), device="cpu",
                               log=lambda _m: None)
    main(["eval", str(tmp_path / "run"), "--text", str(text), "--baseline", str(tmp_path / "run"),
          "--json", str(tmp_path / "eval.json"), "--device", "cpu"])
    written = json.loads((tmp_path / "eval.json").read_text())
    for key in ("loss", "bits_per_byte", "kl_divergence", "top1_agreement", "size_bytes"):
        assert report[key] == pytest.approx(written[key]), key
    assert report["kl_divergence"] == pytest.approx(0.0, abs=1e-6) and report["top1_agreement"] == 1.0

    streamed: list[str] = []
    result = pocketlm.generate(tmp_path / "run", "ROMEO:", max_new_tokens=6, temperature=0, device="cpu",
                               on_text=lambda i, piece: streamed.append(piece))
    capsys.readouterr()
    main(["generate", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "6", "--temperature", "0",
          "--device", "cpu"])
    assert capsys.readouterr().out == result["samples"][0] + "\n" == "".join(streamed) + "\n"
    assert result["new_tokens"] == [6] and result["prompt_tokens"] > 0
