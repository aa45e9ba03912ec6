"""LoRA: targets and counts, adapter-only training, PEFT interop both ways, merge, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm import lora
from pocketlm.cli import main
from pocketlm.errors import UserError
from pocketlm.io import load_model, peft, save_model
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import load_tokenizer

FAMILY_KW = {
    "gpt2": {},
    "llama": dict(n_kv_head=2, intermediate_size=48, bias=False, tie_embeddings=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(family: str, n_embd: int = 32) -> ModelConfig:
    return ModelConfig(name=f"tiny-{family}", family=family, n_layer=2, n_head=4, n_embd=n_embd, block_size=64,
                       **FAMILY_KW[family])


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Tiny random GPT-2 and Llama bases written as model (= Hugging Face) folders."""
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    tok = load_tokenizer("gpt2")
    return {f: save_model(GPT(tiny_config(f)), tok, root / f) for f in ("gpt2", "llama")}


def _nonzero_adapter(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero (the adapter is a no-op); tests need an adapter that changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def _ids(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(7))


def _logits(model, idx) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits


# -- targets, counts, errors ------------------------------------------------------------------------
def test_gpt2_124m_rank8_c_attn_count_and_share(capsys, monkeypatch):
    monkeypatch.setattr(nn.init, "normal_", lambda t, *a, **k: t)  # random init on meta is slow; counts only
    with torch.device("meta"):
        model = GPT.from_name("gpt2")
    info = lora.prepare_model(model, "lora", rank=8, alpha=16, dropout=0.05, targets="c_attn")
    assert info["trainable_params"] == 12 * 8 * (768 + 3 * 768) == 294_912
    assert info["base_params"] == 124_439_808 and info["total_params"] == 124_734_720
    assert round(100 * info["trainable_share"], 4) == 0.2364  # trainable / (base + adapter), as PEFT prints
    assert "trainable parameters: 294,912 of 124,734,720 (0.2364%)" in capsys.readouterr().out


@pytest.mark.parametrize("family,targets,leaves", [
    ("gpt2", "attn", {"c_attn"}),
    ("gpt2", "attn+mlp", {"attn.c_attn", "mlp.c_fc", "mlp.c_proj"}),
    ("gpt2", "all-linear", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    ("gpt2", "c_proj", {"attn.c_proj", "mlp.c_proj"}),  # a leaf name matches every layer with it
    ("gpt2", "mlp.c_proj, c_attn", {"attn.c_attn", "mlp.c_proj"}),
    ("llama", "attn", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("llama", "attn+mlp", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("llama", ["self_attn.q_proj", "v_proj"], {"q_proj", "v_proj"}),  # Hugging Face suffixes work too
])
def test_presets_and_names_resolve(family, targets, leaves):
    model = GPT(tiny_config(family))
    names = lora.resolve_targets(model, targets)
    expected = {n for n in lora.block_linears(model) if any(n.endswith("." + leaf) for leaf in leaves)}
    assert set(names) == expected and len(names) == 2 * len(leaves)  # one match per leaf per layer
    assert not any(n.startswith("lm_head") for n in names)


def test_bad_settings_raise_user_errors():
    model = GPT(tiny_config("gpt2"))
    with pytest.raises(UserError, match=r"'q_proj' matches no linear layer.*c_attn, c_fc, c_proj"):
        lora.prepare_model(model, "lora", 8, 16, 0.0, "q_proj")
    with pytest.raises(UserError, match="'lm_head' matches no linear layer"):  # adapters stay in the blocks
        lora.prepare_model(model, "lora", 8, 16, 0.0, "lm_head")
    for rank in (0, -4):
        with pytest.raises(UserError, match="rank must be a positive integer"):
            lora.prepare_model(model, "lora", rank, 16, 0.0, "attn")
    with pytest.raises(UserError, match="dropout"):
        lora.prepare_model(model, "lora", 8, 16, 1.0, "attn")
    with pytest.raises(UserError, match="lora or qlora"):
        lora.prepare_model(model, "dora", 8, 16, 0.0, "attn")
    assert not lora.lora_modules(model)  # nothing was wrapped by the failed calls


# -- training touches adapters only -----------------------------------------------------------------
def test_only_adapter_parameters_get_gradients_and_optimizer_state():
    torch.manual_seed(0)
    model = GPT(tiny_config("llama"))
    idx = _ids(4, 24)
    before = _logits(model, idx)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    info = lora.prepare_model(model, "lora", 4, 8, 0.0, "all-linear")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == info["trainable_params"]
    assert torch.equal(_logits(model, idx), before)  # B = 0: the wrapped model is the base model

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
        opt.zero_grad()
    # Adapter-only state: gradients and AdamW moments cover 2 * rank * (in + out) per layer, not the model.
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert state_numel == 2 * info["trainable_params"] < 0.01 * 2 * info["base_params"]
    after = {n.replace(".base_layer", ""): v for n, v in model.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(after[k], base_state[k]) for k in base_state)  # the base never moved
    assert not torch.equal(_logits(model, idx), before)


def _reference(layer: lora.LoraLinear, x: torch.Tensor, xd: torch.Tensor) -> torch.Tensor:
    """The textbook LoRA forward with plain autograd (PEFT's formula)."""
    base = layer.base_layer
    return F.linear(x, base.weight, base.bias) + F.linear(F.linear(xd, layer.lora_A), layer.lora_B) * layer.scaling


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_layer_matches_plain_autograd(dropout):
    torch.manual_seed(0)
    layer = lora.LoraLinear(nn.Linear(24, 40), rank=4, alpha=8, dropout=dropout)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    (y * torch.linspace(-1, 1, 40)).sum().backward()
    ours = (y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    for p in (x, layer.lora_A, layer.lora_B):
        p.grad = None
    torch.manual_seed(123)  # the same dropout mask
    xd = F.dropout(x, dropout, training=True) if dropout else x
    ref = _reference(layer, x, xd)
    (ref * torch.linspace(-1, 1, 40)).sum().backward()
    for a, b in zip(ours, (ref.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert layer.base_layer.weight.grad is None

    # bf16 autocast: bf16 output, gradients close to fp32 ones, float32 adapter gradients.
    for p in (x, layer.lora_A, layer.lora_B):
        p.grad = None
    layer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    (y16.float() * torch.linspace(-1, 1, 40)).sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = _reference(layer, x.detach(), x.detach())
    torch.testing.assert_close(y16.float(), ref, rtol=0.05, atol=0.05)


# -- PEFT interop -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_pocketlm_adapter_loads_in_peft_with_equal_logits(bases, family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = load_model(bases[family])
    lora.prepare_model(model, "lora", 4, 8, 0.0, "attn+mlp" if family == "gpt2" else "all-linear",
                       base=bases[family])
    _nonzero_adapter(model)
    folder = peft.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (family == "gpt2") and cfg["base_model_name_or_path"] == str(bases[family])
    from safetensors.torch import load_file

    keys = set(load_file(folder / "adapter_model.safetensors"))
    layer0 = "transformer.h.0.mlp.c_fc" if family == "gpt2" else "model.layers.0.self_attn.q_proj"
    assert f"base_model.model.{layer0}.lora_A.weight" in keys

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases[family]), folder)
    idx = _ids()
    assert (_logits(model, idx) - _logits(peft_model, idx)).abs().max() < 1e-4
    plain = AutoModelForCausalLM.from_pretrained(bases[family])
    assert (_logits(model, idx) - _logits(plain, idx)).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("family,targets,rslora", [("gpt2", ["c_attn"], False), ("llama", "all-linear", True)])
def test_peft_adapter_loads_in_pocketlm_with_equal_logits(bases, family, targets, rslora, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(bases[family]),
                                LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=rslora,
                                           init_lora_weights=False))  # random B: a non-trivial adapter
    peft_model.save_pretrained(tmp_path / "peft")
    model, tokenizer = load_model(str(bases[family]), adapter=tmp_path / "peft")
    idx = _ids()
    assert (_logits(model, idx) - _logits(peft_model, idx)).abs().max() < 1e-4
    assert tokenizer.vocab_size == 50257
    expected = 2 if family == "gpt2" else 14
    assert len(lora.lora_modules(model)) == expected


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_unsupported_options_and_foreign_adapters_are_refused(bases, tmp_path, capsys):
    model, _ = load_model(bases["gpt2"])
    lora.prepare_model(model, "lora", 4, 8, 0.0, "attn", base=bases["gpt2"])
    good = peft.save_adapter(model, tmp_path / "good")

    bad = peft.save_adapter(model, tmp_path / "bad")
    _edit_config(bad, use_dora=True, bias="all", rank_pattern={"c_attn": 2},
                 layers_to_transform=[0], init_lora_weights="loftq")
    with pytest.raises(UserError) as err:
        peft.load_adapter(load_model(bases["gpt2"])[0], bad)
    for option in ("use_dora", "bias", "rank_pattern", "layers_to_transform", "loftq"):
        assert option in str(err.value)
    no_weights = peft.save_adapter(model, tmp_path / "no_weights")  # modules_to_save without their weights
    _edit_config(no_weights, modules_to_save=["lm_head"])
    with pytest.raises(UserError, match="lists 'lm_head' in modules_to_save but holds no weights"):
        peft.load_adapter(load_model(bases["gpt2"])[0], no_weights)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(bad), "--out", str(tmp_path / "merged")])
    assert exit_.value.code == 2 and "use_dora" in capsys.readouterr().err

    # The same adapter on a wider base: a shape mismatch, reported as the wrong base.
    torch.manual_seed(0)
    wider = save_model(GPT(tiny_config("gpt2", n_embd=48)), load_tokenizer("gpt2"), tmp_path / "wider")
    with pytest.raises(UserError, match="does not fit this base model.*another base"):
        load_model(str(wider), adapter=good)
    # A GPT-2 adapter on a Llama base: nothing it targets exists there.
    with pytest.raises(UserError, match="matches no layer.*another base"):
        load_model(str(bases["llama"]), adapter=good)
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")])
    assert exit_.value.code == 2


# -- merge ------------------------------------------------------------------------------------------
def test_merge_folds_adapter_into_a_model_transformers_loads(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = load_model(bases["llama"])
    lora.prepare_model(model, "lora", 4, 8, 0.0, "all-linear", base=bases["llama"])
    _nonzero_adapter(model)
    idx = _ids()
    expected = _logits(model, idx)
    # A run directory's best checkpoint holds adapter/: merge finds it through the pointer.
    run = tmp_path / "run"
    peft.LoraSaver(base=bases["llama"]).save(model, None, run / "checkpoints" / "step-0000004")
    (run / "checkpoints" / "best").write_text("step-0000004")

    main(["merge", str(run), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (_logits(merged, idx) - expected).abs().max() < 1e-4
    ours, _ = load_model(tmp_path / "merged")
    assert not lora.lora_modules(ours) and (_logits(ours, idx) - expected).abs().max() < 1e-4
    assert json.loads((tmp_path / "merged" / "pocketlm.json").read_text())["merged"]["method"] == "lora"

    in_place = lora.merge_lora(model)
    assert not lora.lora_modules(in_place) and all(p.requires_grad for p in in_place.parameters())
    assert (_logits(in_place, idx) - expected).abs().max() < 1e-5
    with pytest.raises(SystemExit):  # --out is not empty now
        main(["merge", str(run), "--out", str(tmp_path / "merged")])
    main(["merge", str(run), "--out", str(tmp_path / "merged"), "--force", "--base", str(bases["llama"])])


# -- runs: exact resume through the training loop ---------------------------------------------------
FINETUNE_FLAGS = ["--batch-tokens", "128", "--micro-batch", "4", "--context", "32", "--max-steps", "6",
                  "--eval-every", "3", "--eval-batches", "2", "--log-every", "1", "--warmup-steps", "1", "--lr", "1e-2",
                  "--device", "cpu", "--precision", "fp32", "--seed", "0", "--rank", "4", "--alpha", "8",
                  "--lora-dropout", "0.1", "--targets", "all-linear"]


def _lora_run(base: Path, data: Path, out: Path, method: str, resume: bool = False) -> None:
    """LoRA through `pocketlm finetune`; QLoRA through train.train with a bare LoraSaver()."""
    if method == "lora":
        main(["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--method", method,
              *FINETUNE_FLAGS, *(["--resume"] if resume else [])])
        return
    from pocketlm.recipe import TrainConfig
    from pocketlm.train import train

    torch.manual_seed(0)
    model, tokenizer = load_model(base)
    lora.prepare_model(model, method, 4, 8, 0.1, "all-linear")
    cfg = TrainConfig(model=str(base), data=str(data), out=str(out), batch_tokens=128, micro_batch=4, context=32,
                      max_steps=6, eval_every=3, eval_batches=2, log_every=1, warmup_steps=1, lr=1e-2,
                      device="cpu", precision="fp32", method=method, resume=resume)
    train(model, tokenizer, cfg, saver=peft.LoraSaver())  # the base comes from `model` in RUN/config.yaml


def _train_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in rows]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_run_resumes_step_for_step(bases, tiny_data, tmp_path, method, monkeypatch):
    from pocketlm.train import Trainer

    _lora_run(bases["gpt2"], tiny_data, tmp_path / "full", method)
    original_save = Trainer.save

    def save_then_die(self, *args, **kwargs):
        original_save(self, *args, **kwargs)
        if self.state["step"] == 3:
            raise _Interrupt  # the process dies right after the step-3 checkpoint
    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(_Interrupt):
        _lora_run(bases["gpt2"], tiny_data, tmp_path / "cut", method)
    monkeypatch.setattr(Trainer, "save", original_save)
    _lora_run(bases["gpt2"], tiny_data, tmp_path / "cut", method, resume=True)
    full = _train_losses(tmp_path / "full")
    assert len(full) == 6 and all(math.isfinite(loss) for _, loss in full)
    assert _train_losses(tmp_path / "cut") == full

    step = tmp_path / "full" / "checkpoints" / (tmp_path / "full" / "checkpoints" / "latest").read_text()
    assert sorted(p.name for p in (step / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "pocketlm_adapter.json"]
    assert json.loads((step / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(bases["gpt2"])
    assert not (step / "model.safetensors").exists()  # a LoRA checkpoint holds the adapter, not the model
    # checkpoint.load_model on the run rebuilds base + adapter (NF4 base for QLoRA).
    model, _ = load_model(tmp_path / "full")
    wrapped = lora.lora_modules(model)
    assert len(wrapped) == 8
    assert all(type(m.base_layer).__name__ == ("NF4Linear" if method == "qlora" else "Linear")
               for m in wrapped.values())


@pytest.mark.parametrize("flags,message", [
    (["--targets", "q_proj"], "'q_proj' matches no linear layer of this gpt2 model: valid names are c_attn"),
    (["--rank", "0"], "rank must be a positive integer"),
])
def test_bad_lora_flags_exit_2_through_the_cli(bases, tiny_data, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--base", str(bases["gpt2"]), "--data", str(tiny_data), "--out", str(tmp_path / "run"),
              "--method", "lora", "--max-steps", "1", "--device", "cpu", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_swiglu_down_projection_recomputes_its_input_with_the_same_numbers(precision):
    """Llama's LoRA down_proj takes the SwiGLU gate and recomputes silu(gate) * up in backward:
    same loss and gradients as ops.swiglu's product, one (tokens x width) tensor fewer saved per layer."""
    torch.manual_seed(0)
    model = GPT(tiny_config("llama"))
    lora.prepare_model(model, "lora", rank=4, alpha=8, dropout=0.0, targets="all-linear")
    _nonzero_adapter(model)
    ids = _ids(2, 16)

    def run(fused: bool):
        for block in model.transformer.h:
            block.mlp.down_proj.takes_swiglu_gate = fused
        model.zero_grad(set_to_none=True)
        width = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: width.append(t.untyped_storage().data_ptr()) or t if t.shape[-1] == 48 else t,
                lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, len(set(width))

    plain_loss, plain_grads, plain_saved = run(False)
    loss, grads, saved = run(True)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 layers x 2 blocks
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert saved == plain_saved - 2  # per block: the product is not kept (gate and up are, by both)


def test_bf16_training_holds_the_frozen_base_in_bf16_with_identical_numbers():
    """Under bf16 autocast the trainer stores frozen block linears in bf16: autocast would cast them
    to exactly these values on every use, so loss and adapter gradients do not change."""
    from pocketlm.train import store_frozen_linears

    torch.manual_seed(0)
    model = GPT(tiny_config("llama"))
    lora.prepare_model(model, "lora", rank=4, alpha=8, dropout=0.0, targets="attn")  # MLP stays plain, frozen
    _nonzero_adapter(model)
    ids = _ids(2, 16)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads()
    store_frozen_linears(model, "fp32")  # fp32 training: nothing changes
    assert all(p.dtype == torch.float32 for p in model.parameters())
    store_frozen_linears(model, "bf16")
    blocks = model.transformer.h[0]
    assert blocks.attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert blocks.mlp.up_proj.weight.dtype == torch.bfloat16
    assert blocks.attn.q_proj.lora_A.dtype == torch.float32  # what the optimizer updates stays fp32
    assert model.transformer.wte.weight.dtype == torch.float32 and blocks.ln_1.weight.dtype == torch.float32
    loss, grads = loss_and_grads()
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method, targets", [("lora", "all-linear"), ("lora", "attn"), ("qlora", "all-linear")])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_projections_of_one_input_share_one_matmul_with_the_same_loss_and_gradients(method, targets, precision,
                                                                                     monkeypatch):
    """Llama's q/k/v and gate/up run as one fused matmul while training (LoRA layers, or the frozen
    untargeted base): same loss and gradients as each layer alone, and the fused path is really taken."""
    from pocketlm import quant

    torch.manual_seed(0)
    model = GPT(tiny_config("llama"))
    lora.prepare_model(model, method, rank=4, alpha=8, dropout=0.0, targets=targets)
    _nonzero_adapter(model)
    model.transformer.h[0].attn.k_proj.scaling = 3.0  # layers of one group may scale differently (rank_pattern)
    ids = _ids(2, 16)
    fused_calls = []
    real_apply = quant._SharedInputLora.apply
    monkeypatch.setattr(quant._SharedInputLora, "apply", lambda *a: fused_calls.append(1) or real_apply(*a))

    def run(share: bool):
        monkeypatch.setattr(lora, "SHARE_INPUT_MATMULS", share)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = model(ids[:, :-1], ids[:, 1:], return_logits=False)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = run(False)
    assert fused_calls == []
    loss, grads = run(True)
    assert len(fused_calls) == 2 * 2  # q/k/v and gate/up in each of 2 blocks
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, plain_loss, **tol)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], **tol, msg=name)
    model.eval()
    fused_calls.clear()
    with torch.no_grad():  # inference: never fused (it would copy the weights for every token)
        model(ids)
    assert fused_calls == []
