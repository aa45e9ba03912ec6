"""Quantization-aware fine-tuning: the quantized folder of a QAT run is exactly what its training saw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pocketlm.cli import main
from pocketlm.compress import formats as fm
from pocketlm.compress.qat import QATOptions
from pocketlm.errors import UserError
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import load_tokenizer

FLAGS = ["--device", "cpu", "--precision", "fp32", "--context", "32", "--micro-batch", "4", "--batch-tokens", "128",
         "--eval-batches", "2", "--warmup-steps", "1", "--log-every", "1", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from pocketlm.io import save_model

    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny-llama", family="llama", vocab_size=50257, block_size=64, n_layer=2, n_head=4,
                      n_kv_head=2, n_embd=64, intermediate_size=128, bias=False, tie_embeddings=True,
                      tokenizer="gpt2")
    return save_model(GPT(cfg), load_tokenizer("gpt2"), tmp_path_factory.mktemp("qat") / "base")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _finetune(base: Path, data: Path, out: Path, *extra: str, method: str = "full") -> None:
    adapter = ["--rank", "4", "--targets", "attn"] if method == "lora" else []  # the MLP stays frozen
    main(["finetune", "--base", str(base), "--data", str(data), "--method", method, *adapter, "--out", str(out),
          *FLAGS, *extra])


def _val_loss(folder: Path, data: Path) -> float:
    """A quantized folder's validation loss, computed as the training evaluated it (fp32, 2 batches of 4)."""
    from pocketlm.compress.modules import set_compute_dtype
    from pocketlm.data.batches import Batches, TokenSplit
    from pocketlm.io import load_model
    from pocketlm.train import evaluate_loss

    model, _ = load_model(folder)
    set_compute_dtype(model, torch.float32)  # the training evaluated in fp32 (--precision fp32)
    val = Batches(TokenSplit(str(data), "val"), 32, 1337, shuffle=False)
    return evaluate_loss(model, val, 2, 4, torch.device("cpu"), "fp32")


def test_straight_through_gradient():
    w = torch.randn(16, 64, requires_grad=True)
    q = fm.fake_quantize_ste(w, "int4", 32, "sym")
    assert not torch.equal(q, w) and torch.equal(q.detach(), fm.fake_quantize(w, "int4"))
    (q * torch.arange(64.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(64.0).expand(16, 64))


def test_quantized_qat_run_has_the_last_fake_quantized_val_loss(base, tiny_data, tmp_path, one_thread):
    from pocketlm.compress.api import quantize

    run = tmp_path / "qat"
    _finetune(base, tiny_data, run, "--qat", "int4", "--max-steps", "4", "--eval-every", "4")
    last = [r["val_loss"] for r in _rows(run) if "val_loss" in r][-1]
    assert json.loads((run / "checkpoints" / "step-0000004" / "qat.json").read_text())["format"] == "int4"
    quantize(run, "int4", tmp_path / "q", progress=False)
    assert _val_loss(tmp_path / "q", tiny_data) == pytest.approx(last, abs=2e-5)
    # ...and differs from post-training quantization of the float weights a plain run would have
    plain = tmp_path / "plain"
    _finetune(base, tiny_data, plain, "--max-steps", "4", "--eval-every", "4")
    assert _rows(plain)[-1]["val_loss"] != pytest.approx(last, abs=1e-4)


def test_lora_qat_quantized_merged_run_has_the_last_fake_quantized_val_loss(base, tiny_data, tmp_path,
                                                                            one_thread):
    from pocketlm.compress.api import quantize
    from pocketlm.compress.qat import FakeQuantLoraLinear

    run = tmp_path / "lora-qat"
    _finetune(base, tiny_data, run, "--qat", "int4", "--max-steps", "4", "--eval-every", "4", method="lora")
    last = [r["val_loss"] for r in _rows(run) if "val_loss" in r][-1]
    assert json.loads((run / "checkpoints" / "step-0000004" / "qat.json").read_text())["format"] == "int4"
    assert json.loads((run / "summary.json").read_text())["adapter"]["trainable_params"] > 0
    quantize(run, "int4", tmp_path / "q", progress=False)  # base + adapter merged, then quantized
    assert _val_loss(tmp_path / "q", tiny_data) == pytest.approx(last, abs=2e-5)
    # without QAT the merged adapter's quantization is not what the (float) training evaluated
    plain = tmp_path / "lora-plain"
    _finetune(base, tiny_data, plain, "--max-steps", "4", "--eval-every", "4", method="lora")
    plain_last = [r["val_loss"] for r in _rows(plain) if "val_loss" in r][-1]
    quantize(plain, "int4", tmp_path / "qp", progress=False)
    assert _val_loss(tmp_path / "qp", tiny_data) != pytest.approx(plain_last, abs=1e-4)
    # the STE gradient reaches the adapter through the fake-quantized merged weight
    from pocketlm import lora
    from pocketlm.compress.qat import QATOptions, prepare_qat
    from pocketlm.io import load_model

    model, _ = load_model(base)
    lora.prepare_model(model, "lora", 4, 8, 0.0, "attn")
    prepare_qat(model, QATOptions("int4"), saver=None, method="lora").state.hook.remove()
    layer = model.transformer.h[0].attn.q_proj
    assert isinstance(layer, FakeQuantLoraLinear)
    model(torch.randint(0, 50257, (1, 8)), targets=torch.randint(0, 50257, (1, 8)))[1].backward()
    assert layer.lora_B.grad.abs().sum() > 0 and layer.base_layer.weight.grad is None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_qat_start_step_and_exact_resume(base, tiny_data, tmp_path, one_thread, method):
    full = tmp_path / "full"
    _finetune(base, tiny_data, full, "--qat", "int8", "--qat-start-step", "2", "--max-steps", "4",
              "--eval-every", "2", method=method)
    part = tmp_path / "part"
    _finetune(base, tiny_data, part, "--qat", "int8", "--qat-start-step", "2", "--max-steps", "4",
              "--eval-every", "2", method=method)
    # kill after step 2: keep only the step-2 checkpoint and its metrics, then resume
    shutil.rmtree(part / "checkpoints" / "step-0000004")
    (part / "checkpoints" / "latest").write_text("step-0000002")
    _finetune(base, tiny_data, part, "--qat", "int8", "--qat-start-step", "2", "--max-steps", "4",
              "--eval-every", "2", "--resume", method=method)
    a = [(r["step"], r["train_loss"], r.get("val_loss")) for r in _rows(full)]
    b = [(r["step"], r["train_loss"], r.get("val_loss")) for r in _rows(part)]
    assert a == b
    with pytest.raises(SystemExit) as exc:  # resuming with other QAT settings is refused
        _finetune(base, tiny_data, part, "--qat", "int4", "--max-steps", "6", "--eval-every", "2", "--resume",
                  method=method)
    assert exc.value.code == 2


def test_qat_bad_input(base, tiny_data, tmp_path):
    from pocketlm.compress.api import quantize

    QATOptions("int4").validate("lora")
    with pytest.raises(UserError, match="--method full or lora"):
        QATOptions("int4").validate("qlora")
    with pytest.raises(UserError, match="--lora-dropout 0"):
        QATOptions("int4").validate("lora", 0.1)
    quantize(base, "int4", tmp_path / "q4", progress=False)
    with pytest.raises(SystemExit) as exc:  # LoRA QAT over an already quantized base is refused
        _finetune(tmp_path / "q4", tiny_data, tmp_path / "run", "--qat", "int4", "--max-steps", "1",
                  method="lora")
    assert exc.value.code == 2 and not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(UserError, match="choose one of"):
        QATOptions("nf4").validate("full")
    with pytest.raises(UserError, match="start-step"):
        QATOptions("int4", start_step=-1).validate("full")


def test_lora_on_an_int4_folder_and_full_on_an_int8_folder(base, tiny_data, tmp_path, one_thread):
    from pocketlm.compress.api import quantize
    from pocketlm.compress.modules import Int4Linear
    from pocketlm.io import load_model
    from pocketlm.lora import LoraLinear

    quantize(base, "int4", tmp_path / "q4", progress=False)
    run = tmp_path / "lora"
    main(["finetune", "--base", str(tmp_path / "q4"), "--data", str(tiny_data), "--method", "lora", "--rank", "4",
          "--targets", "attn+mlp", "--out", str(run), *FLAGS, "--max-steps", "3", "--eval-every", "3"])
    losses = [r["train_loss"] for r in _rows(run)]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses) and losses[-1] < losses[0]
    model, _ = load_model(run)  # base folder + adapter: LoRA over the int4 kernels' weights
    layer = model.transformer.h[0].mlp.up_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, Int4Linear)
    assert layer.lora_B.abs().sum() > 0
    quantize(base, "int8", tmp_path / "q8", progress=False)
    full = tmp_path / "full"
    _finetune(tmp_path / "q8", tiny_data, full, "--max-steps", "2", "--eval-every", "2")
    assert json.loads((full / "summary.json").read_text())["base_dequantized"] is True
