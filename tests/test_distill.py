"""Logit distillation: the loss, its chunking, the teacher checks, and training with a teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocketlm import distill
from pocketlm.distill import (
    DistillationObjective,
    DistillSettings,
    check_teacher_tokenizer,
    distillation_loss,
)
from pocketlm.errors import UserError


def reference(student, teacher, targets, alpha, temperature):
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), targets.reshape(-1))
    kl = F.kl_div(F.log_softmax(student / temperature, -1).reshape(-1, student.shape[-1]),
                  F.log_softmax(teacher / temperature, -1).reshape(-1, student.shape[-1]),
                  log_target=True, reduction="batchmean")
    return ce + alpha * temperature**2 * kl


def test_loss_is_cross_entropy_plus_scaled_kl_and_chunking_changes_nothing(monkeypatch):
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    loss, parts = distillation_loss(student, teacher, targets, alpha=0.7, temperature=2.0)
    expected = reference(student, teacher, targets, 0.7, 2.0)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    monkeypatch.setattr(distill, "_CHUNK_ELEMENTS", 11 * 3)  # 3 rows a chunk, recomputed in backward
    chunked, _ = distillation_loss(student, teacher, targets, alpha=0.7, temperature=2.0)
    (chunked_grad,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, expected)
    torch.testing.assert_close(chunked_grad, expected_grad)
    torch.testing.assert_close(grad, expected_grad)
    plain, parts = distillation_loss(student, teacher, targets, alpha=0.0, temperature=2.0)
    torch.testing.assert_close(plain, F.cross_entropy(student.reshape(-1, 11), targets.reshape(-1)))
    assert parts["kl"] > 0


def test_kl_vanishes_when_student_equals_teacher_and_ignores_masked_targets():
    logits = torch.randn(1, 4, 7)
    targets = torch.tensor([[1, 2, -100, 3]])
    _, parts = distillation_loss(logits, logits.clone(), targets, alpha=1.0, temperature=3.0)
    assert abs(float(parts["kl"])) < 1e-6
    other = logits.clone()
    other[0, 2] += 5  # only the ignored position differs
    _, parts = distillation_loss(logits, other, targets, alpha=1.0, temperature=3.0)
    assert abs(float(parts["kl"])) < 1e-6


def test_settings_and_tokenizer_checks():
    from pocketlm.tokenizer import load_tokenizer

    with pytest.raises(UserError, match="--distill-alpha"):
        DistillSettings("t", alpha=-1).validate()
    with pytest.raises(UserError, match="--distill-temperature"):
        DistillSettings("t", temperature=0).validate()
    gpt2 = load_tokenizer("gpt2")
    check_teacher_tokenizer(gpt2, load_tokenizer("gpt2"), "teacher")
    other = type("Tok", (), {"identity": "sha256:" + "0" * 64, "name": "other"})()
    with pytest.raises(UserError, match="uses another tokenizer") as info:
        check_teacher_tokenizer(other, gpt2, "teacher-x")
    assert "\n" not in str(info.value)


def test_objective_trains_toward_the_teacher_and_validates_on_the_data_alone():
    from pocketlm.model import GPT

    torch.manual_seed(0)
    teacher = GPT.from_name("gpt2-tiny", n_layer=1).eval()
    student = GPT.from_name("gpt2-tiny", n_layer=1)
    x = torch.randint(0, 50257, (2, 16))
    y = torch.roll(x, -1, 1)
    objective = DistillationObjective(DistillSettings("teacher", alpha=1.0, temperature=2.0), teacher=teacher)
    loss = objective.loss(student, (x, y))
    assert set(objective.last) == {"lm_loss", "kl"} and loss.requires_grad
    with torch.no_grad():
        val = objective.loss(student, (x, y))
        torch.testing.assert_close(val, student(x, y, return_logits=False)[1])
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    kls = []
    for _ in range(5):
        loss = objective.loss(student, (x, y))
        kls.append(float(objective.last["kl"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert kls[-1] < kls[0]
    assert all(p.grad is None for p in teacher.parameters())


# -- training with a teacher (pocketlm.train.Trainer) --------------------------------------------------

SMALL = dict(model="gpt2-tiny", batch_tokens=256, micro_batch=4, context=32, eval_every=4, eval_batches=2,
             log_every=1, warmup_steps=2, lr=3e-3, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_data):
    """A gpt2-tiny teacher trained a few steps on the tiny data (so it knows something the student does not)."""
    from pocketlm.recipe import TrainConfig
    from pocketlm.train import build_model, train

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = TrainConfig(data=str(tiny_data), out=str(out), max_steps=4, seed=7, **{**SMALL, "eval_every": 4})
    model, tokenizer = build_model(cfg.model, cfg.data, cfg.seed)
    train(model, tokenizer, cfg)
    return out


def _run(tiny_data, out, **kw):
    import json

    from pocketlm.recipe import TrainConfig
    from pocketlm.train import build_model, train

    cfg = TrainConfig(data=str(tiny_data), out=str(out), **{**SMALL, **kw})
    model, tokenizer = build_model(cfg.model, cfg.data, cfg.seed)
    summary = train(model, tokenizer, cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_distilled_from_scratch_student_resumes_exactly(tiny_data, teacher_dir, tmp_path, monkeypatch, one_thread):
    from pocketlm.train import Trainer

    kw = dict(max_steps=6, save_every=2, eval_every=3, teacher=str(teacher_dir), distill_alpha=1.0,
              distill_temperature=2.0)
    summary, full = _run(tiny_data, tmp_path / "full", **kw)
    assert summary["distill"] == {"teacher": str(teacher_dir), "alpha": 1.0, "temperature": 2.0}
    _, plain = _run(tiny_data, tmp_path / "plain", max_steps=6, save_every=2, eval_every=3)
    assert [r["train_loss"] for r in full] != [r["train_loss"] for r in plain]  # the KL term is in the loss
    # alpha 0 is plain training, step for step
    _, zero = _run(tiny_data, tmp_path / "zero", **{**kw, "distill_alpha": 0.0})
    assert [r["train_loss"] for r in zero] == pytest.approx([r["train_loss"] for r in plain], abs=1e-5)

    class Interrupt(Exception):
        pass

    original = Trainer.save

    def save_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state["step"] == 4:
            raise Interrupt
    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Interrupt):
        _run(tiny_data, tmp_path / "cut", **kw)
    monkeypatch.setattr(Trainer, "save", original)
    _, resumed = _run(tiny_data, tmp_path / "cut", resume=True, **kw)
    assert [(r["step"], r["train_loss"], r.get("val_loss")) for r in resumed] == \
        [(r["step"], r["train_loss"], r.get("val_loss")) for r in full]


def test_lora_student_with_a_teacher_through_the_cli(tiny_data, teacher_dir, tmp_path, capsys, one_thread):
    import json

    from pocketlm.cli import main

    main(["finetune", "--base", str(teacher_dir), "--data", str(tiny_data), "--method", "lora", "--rank", "4",
          "--out", str(tmp_path / "lora"), "--teacher", str(teacher_dir), "--distill-alpha", "0.5",
          "--distill-temperature", "2", "--max-steps", "2", "--batch-tokens", "128", "--micro-batch", "4",
          "--context", "32", "--eval-every", "2", "--eval-batches", "1", "--device", "cpu", "--precision", "fp32"])
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert summary["distill"]["alpha"] == 0.5 and summary["adapter"]["rank"] == 4
    config = (tmp_path / "lora" / "config.yaml").read_text()
    assert "teacher: " in config and "distill_temperature: 2.0" in config


def test_teacher_with_another_tokenizer_is_a_one_line_error(tiny_data, tmp_path, capsys):
    from pocketlm.cli import main
    from pocketlm.io import save_model
    from pocketlm.model import GPT
    from pocketlm.tokenizer import Tokenizer, load_tokenizer

    gpt2 = load_tokenizer("gpt2")
    # The same vocabulary with another end-of-text token is another tokenizer (content identity).
    backend = gpt2.backend.__class__.from_str(gpt2.backend.to_str())
    backend.add_special_tokens(["<|other|>"])
    other = Tokenizer(backend, name="gpt2-other", eos_token="<|other|>")
    teacher = save_model(GPT.from_name("gpt2-tiny"), other, tmp_path / "teacher")
    for command in (["pretrain", "--model", "gpt2-tiny"], ["finetune", "--base", str(teacher)]):
        base = command if command[0] == "pretrain" else ["finetune", "--base", "gpt2-tiny"]
        args = base + ["--data", str(tiny_data), "--out", str(tmp_path / f"run-{command[0]}"), "--teacher",
                       str(teacher), "--max-steps", "1", "--device", "cpu"]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"pocketlm {command[0]}: error: the teacher") and "another tokenizer" in err[-1]
        assert not (tmp_path / f"run-{command[0]}" / "checkpoints").exists()
