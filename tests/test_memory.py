"""Training-memory machinery: the chunked lm_head + cross-entropy in GPT.forward, and allocator tuning."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pocketlm.model
from pocketlm.memory import find_tcmalloc
from pocketlm.model import GPT, ModelConfig

VOCAB = 1000


def _model(padded: int | None = None) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, padded_vocab_size=padded, block_size=32, n_layer=1, n_head=2, n_embd=32)
    return GPT(config).train()


@pytest.fixture(autouse=True)
def _small_loss_chunks(monkeypatch):
    monkeypatch.setattr(pocketlm.model, "_LOSS_CHUNK_ELEMENTS", 7 * VOCAB)  # several chunks, a ragged last one


def _loss_and_grads(model: GPT, x, y, chunked: bool, precision: str = "fp32"):
    """Loss via the chunked loss-only path, or via plain F.cross_entropy on the returned logits."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        if chunked:
            logits, loss = model(x, y, return_logits=False)
            assert logits is None
        else:
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)
    (2.5 * loss).backward()  # an upstream gradient other than 1, as gradient accumulation gives
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("padded", [None, 1024])
def test_chunked_loss_matches_plain_cross_entropy_and_its_gradients(padded):
    model = _model(padded)
    x = torch.randint(0, VOCAB, (2, 24))
    y = torch.randint(0, VOCAB, (2, 24))
    y[0, :7] = -100  # ignored positions count for nothing
    ref_loss, ref_grads = _loss_and_grads(model, x, y, chunked=False)
    loss, grads = _loss_and_grads(model, x, y, chunked=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    logits, plain = model(x, y)  # the default keeps returning logits, with the same loss
    assert logits.shape == (2, 24, VOCAB)
    torch.testing.assert_close(plain.detach(), ref_loss)


def test_chunked_loss_under_bf16_autocast_is_as_accurate_as_the_plain_path():
    model = _model()
    x, y = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    exact_loss, exact = _loss_and_grads(model, x, y, chunked=False)  # fp32: the reference for both
    plain_loss, plain = _loss_and_grads(model, x, y, chunked=False, precision="bf16")
    loss, grads = _loss_and_grads(model, x, y, chunked=True, precision="bf16")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 softmax
    for name in grads:  # bf16 rounding differs by summation order: compare errors, not bits
        error = (grads[name] - exact[name]).abs().max()
        plain_error = (plain[name] - exact[name]).abs().max()
        assert error <= 2 * plain_error + 1e-6, name
        assert error <= 0.02 * exact[name].abs().max(), name


def test_chunked_loss_with_a_frozen_head_no_grad_and_all_targets_ignored():
    model = _model()
    model.lm_head.weight.requires_grad_(False)  # as in LoRA: only the blocks train
    x = torch.randint(0, VOCAB, (1, 8))
    _, loss = model(x, torch.randint(0, VOCAB, (1, 8)), return_logits=False)
    loss.backward()
    assert model.lm_head.weight.grad is None
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None
    with torch.no_grad():  # evaluation: the loss alone, no gradient work
        _, evaluated = model(x, torch.randint(0, VOCAB, (1, 8)), return_logits=False)
    assert evaluated.grad_fn is None and torch.isfinite(evaluated)
    _, nothing = model(x, torch.full((1, 8), -100), return_logits=False)
    assert torch.isnan(nothing)  # as F.cross_entropy: a mean over no targets


def test_chunked_loss_never_saves_the_logits_for_backward():
    model = GPT(ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=1, n_head=2, n_embd=32)).train()
    x, y = torch.randint(0, VOCAB, (4, 64)), torch.randint(0, VOCAB, (4, 64))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x, y, return_logits=False)
    assert saved and max(t.numel() for t in saved) < 4 * 64 * VOCAB // 4


# -- allocator -----------------------------------------------------------------------------------
_FAULTS_SCRIPT = """
import resource, sys
from pocketlm.memory import tune_allocator
state = tune_allocator()
import torch
def churn():
    for _ in range(12):  # a training step's pattern: allocate a big tensor, touch it, free it
        t = torch.empty(64 * 2**20 // 4)
        t.fill_(1.0)
        del t
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(state, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _clean_env(extra: dict | None = None) -> dict:
    """This environment without a preloaded or chosen allocator, plus `extra`."""
    import os

    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "POCKETLM_ALLOCATOR")} | (extra or {})


def _run_faults(env_extra: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=_clean_env(env_extra), capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    state, faults = out.stdout.split()
    return state, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_glibc_reuses_freed_memory_instead_of_faulting_it_back():
    plain_state, plain_faults = _run_faults({"POCKETLM_TUNE_ALLOCATOR": "0"})
    tuned_state, tuned_faults = _run_faults({})
    assert (plain_state, tuned_state) == ("glibc", "glibc-tuned")
    # 12 x 64 MB freshly mapped: ~196k faults with plain glibc; reused heap memory faults ~not at all.
    assert plain_faults > 100_000
    assert tuned_faults < plain_faults / 20


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc not installed (libgoogle-perftools4)")
def test_a_preloaded_tcmalloc_is_detected_and_left_alone():
    state, faults = _run_faults({"LD_PRELOAD": find_tcmalloc()})
    assert state == "tcmalloc"
    assert faults < 20_000


# -- choosing the allocator: POCKETLM_ALLOCATOR and the CLI's re-execution with tcmalloc ----------
FAKE_TCMALLOC = "/opt/fake/libtcmalloc.so.4"


@pytest.fixture
def fake_tcmalloc(monkeypatch):
    import pocketlm.memory as memory

    monkeypatch.setattr(memory, "find_tcmalloc", lambda: FAKE_TCMALLOC)
    monkeypatch.setattr(memory, "preloaded_allocator", lambda: None)
    monkeypatch.setattr(memory.platform, "system", lambda: "Linux")
    return memory


def test_auto_preloads_an_installed_tcmalloc_once(fake_tcmalloc):
    env = fake_tcmalloc.tcmalloc_environment({"LD_PRELOAD": "/x/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{FAKE_TCMALLOC}:/x/other.so" and env["PATH"] == "/bin"
    assert fake_tcmalloc.tcmalloc_environment(env) is None  # the re-executed process does not exec again
    assert fake_tcmalloc.tcmalloc_environment({"POCKETLM_ALLOCATOR": "tcmalloc"})["LD_PRELOAD"] == FAKE_TCMALLOC


@pytest.mark.parametrize("environ", [{"POCKETLM_ALLOCATOR": "glibc-tuned"}, {"POCKETLM_ALLOCATOR": "glibc"},
                                     {"POCKETLM_TUNE_ALLOCATOR": "0"}])
def test_other_allocator_choices_keep_the_process(fake_tcmalloc, environ):
    assert fake_tcmalloc.tcmalloc_environment(environ) is None


def test_missing_tcmalloc_is_fine_under_auto_and_an_error_when_required(fake_tcmalloc, monkeypatch):
    from pocketlm.errors import UserError

    monkeypatch.setattr(fake_tcmalloc, "find_tcmalloc", lambda: None)
    assert fake_tcmalloc.tcmalloc_environment({}) is None
    with pytest.raises(UserError, match="apt-get install libgoogle-perftools4"):
        fake_tcmalloc.tcmalloc_environment({"POCKETLM_ALLOCATOR": "tcmalloc"})


def _cli(args: list[str], env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketlm", *args], env=_clean_env(env_extra), capture_output=True, text=True,
                          cwd=cwd)


def test_cli_rejects_an_unknown_allocator(tmp_path):
    proc = _cli(["finetune", "--help"], {"POCKETLM_ALLOCATOR": "jemalloc2"}, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "POCKETLM_ALLOCATOR='jemalloc2'" in proc.stderr


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("choice", ["auto", "glibc-tuned"])
def test_cli_training_runs_under_the_chosen_allocator(choice, tiny_data, tmp_path):
    import json

    run = tmp_path / "run"
    proc = _cli(["pretrain", "--model", "gpt2-tiny", "--data", str(tiny_data), "--out", str(run),
                 "--max-steps", "2", "--context", "32", "--micro-batch", "4", "--batch-tokens", "128",
                 "--device", "cpu"], {"POCKETLM_ALLOCATOR": choice}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "tcmalloc" if choice == "auto" and find_tcmalloc() else "glibc-tuned"
    assert json.loads((run / "summary.json").read_text())["allocator"] == expected


_RELEASE_SCRIPT = """
import gc
from pocketlm.memory import release_free_memory, tune_allocator
tune_allocator()  # tuned glibc never trims on its own: freed memory stays resident until released
import torch
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
held = [torch.ones(900_000) for _ in range(150)]  # ~0.5 GB in weight-sized blocks
del held
gc.collect()
before = rss()
release_free_memory()
print(before - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_free_memory_hands_freed_memory_back():
    out = subprocess.run([sys.executable, "-c", _RELEASE_SCRIPT], env=_clean_env(), capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert int(out.stdout.strip()) > 400 * 2**20
