"""Fixtures of the fault-injection suite: a tiny base model, its data set, and finished runs to damage.

Everything is tiny (a 512-token BPE, 2-layer models of width 32-64, 32-token contexts) so that a case
takes a second in this process; cases that need a real process (signals, full disks) are few in the
default suite and many under `-m slow`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.faults.harness import run_inprocess

TRAIN_FLAGS = ["--device", "cpu", "--precision", "fp32", "--context", "32", "--micro-batch", "2",
               "--batch-tokens", "128", "--eval-batches", "2", "--warmup-steps", "1", "--log-every", "1",
               "--eval-every", "2", "--lr", "3e-3"]


def small_tokenizer(text: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from pocketlm.tokenizer import Tokenizer

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text], trainer)
    return Tokenizer(backend, "small", "<|endoftext|>")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tiny_text) -> Path:
    return tiny_text


@pytest.fixture(scope="session")
def base(tmp_path_factory, tiny_text) -> Path:
    """A 2-layer llama model folder with its own 512-token tokenizer."""
    from pocketlm.io import save_model
    from pocketlm.model import GPT, ModelConfig

    tok = small_tokenizer(tiny_text.read_text())
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=64, intermediate_size=128, bias=False, tokenizer="small")
    return save_model(GPT(cfg), tok, tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="session")
def data(tmp_path_factory, tiny_text, base) -> Path:
    from pocketlm.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "data"
    prepare(tiny_text, out, tokenizer=str(base), val_fraction=0.1, min_val_tokens=65, progress=False,
            log=lambda _m: None)
    return out


def _train(capsys, argv):
    from tests.faults.harness import assert_ok

    assert_ok(run_inprocess(argv, capsys))


@pytest.fixture(scope="session")
def runs(tmp_path_factory, base, data):
    """Finished runs, made once: pretrain (gpt2-tiny on the small vocabulary), LoRA on the base."""
    folder = tmp_path_factory.mktemp("runs")
    made = {}

    def get(kind: str, capsys) -> Path:
        if kind not in made:
            out = folder / kind
            if kind == "pretrain":
                argv = ["pretrain", "--model", "gpt2-tiny", "--data", data, "--max-steps", "4", "--out", out]
            else:
                argv = ["finetune", "--base", base, "--data", data, "--method", kind, "--max-steps", "4",
                        "--out", out, *(["--rank", "4", "--targets", "attn"] if kind != "full" else [])]
            _train(capsys, [*argv, *TRAIN_FLAGS])
            made[kind] = out
        return made[kind]

    return get


@pytest.fixture
def copy_of(tmp_path):
    """A private copy of a fixture's folder, to damage."""
    def copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return copy
