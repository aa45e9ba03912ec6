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
