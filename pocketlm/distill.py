"""Logit distillation: the student learns the teacher's next-token distribution as well as the data.

    loss = CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over the target tokens (Hinton et al., 2015; T^2 keeps the soft term's gradient on the scale of
the hard term's as T grows). alpha = 0 is plain language-model training. The teacher runs in the same
process without gradients, in eval mode (no dropout, so a resumed run sees the same teacher outputs),
held in bf16 when the run trains under bf16 autocast. Teacher and student must share a tokenizer: the KL
compares the two distributions token id by token id.

Memory: the student's logits for a micro-batch are materialised (the plain path never holds them), and
the loss is computed in row chunks under activation checkpointing, so only one chunk of softmax
intermediates exists at a time. Lower --micro-batch if a distillation run runs out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pocketlm.device import precision_dtype
from pocketlm.errors import UserError

_CHUNK_ELEMENTS = 1 << 24  # logits per loss chunk (64 MB in fp32)


@dataclass
class DistillSettings:
    teacher: str
    alpha: float = 0.5
    temperature: float = 2.0

    def validate(self) -> None:
        if not self.alpha >= 0:
            raise UserError(f"--distill-alpha must be >= 0 (0 = no distillation), got {self.alpha}")
        if not self.temperature > 0:
            raise UserError(f"--distill-temperature must be > 0 (1 = the raw distributions), got {self.temperature}")


def _chunk_losses(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and summed KL(teacher_T || student_T) over the valid rows of one chunk."""
    s = student.float()
    valid = targets != -100
    ce = F.cross_entropy(s, targets, ignore_index=-100, reduction="sum")
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return ce, torch.where(valid, kl, 0.0).sum()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float, temperature: float) -> tuple[torch.Tensor, dict]:
    """(loss, {"lm_loss", "kl"}) from logits (B, T, V) and targets (B, T) (-100 = ignored)."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = student_logits[..., :vocab].reshape(-1, vocab)
    t = teacher_logits[..., :vocab].reshape(-1, vocab)
    y = targets.reshape(-1)
    count = (y != -100).sum().clamp(min=1)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    ce_total = s.new_zeros((), dtype=torch.float32)
    kl_total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], rows):
        part = (s[start : start + rows], t[start : start + rows], y[start : start + rows])
        if s.requires_grad:  # keep only the chunk's inputs; recompute its softmaxes in backward
            ce, kl = checkpoint(_chunk_losses, *part, temperature, use_reentrant=False)
        else:
            ce, kl = _chunk_losses(*part, temperature)
        ce_total = ce_total + ce
        kl_total = kl_total + kl
    lm_loss = ce_total / count
    kl = kl_total / count
    loss = lm_loss + alpha * temperature**2 * kl
    return loss, {"lm_loss": lm_loss.detach(), "kl": kl.detach()}


class DistillationObjective:
    """A Trainer objective (pocketlm.objectives): `loss(model, batch)` for one micro-batch (inputs, targets).

    `setup(trainer)` loads the teacher on the trainer's device (unless one was given). Under no_grad -- the
    validation pass -- the loss is the plain next-token loss, so validation losses of runs with and without
    distillation compare. `last` holds the latest training micro-batch's parts (lm_loss, kl).
    """

    def __init__(self, settings: DistillSettings, teacher: torch.nn.Module | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.teacher = teacher
        self.last: dict = {}

    def setup(self, trainer) -> None:
        if self.teacher is None:
            context = trainer.cfg.context or getattr(trainer, "model_context", None)
            self.teacher = load_teacher(self.settings, trainer.tokenizer, trainer.device, trainer.precision,
                                        context=context)

    def loss(self, model, batch) -> torch.Tensor:
        inputs, targets = batch
        if not torch.is_grad_enabled():  # validation: the data's loss alone
            return model(inputs, targets, return_logits=False)[1]
        with torch.no_grad():
            teacher_logits, _ = self.teacher(inputs)
        student_logits, _ = model(inputs)
        loss, self.last = distillation_loss(student_logits, teacher_logits, targets, self.settings.alpha,
                                            self.settings.temperature)
        return loss


def load_teacher(settings: DistillSettings, student_tokenizer, device: torch.device, precision: str,
                 context: int | None = None) -> torch.nn.Module:
    """The teacher model for distillation, after checking it shares the student's tokenizer."""
    from pocketlm.synth.models import load_for_inference
    from pocketlm.tokenizer import load_tokenizer

    settings.validate()
    teacher_tokenizer = load_tokenizer(settings.teacher)  # cheap: before any weights load
    check_teacher_tokenizer(teacher_tokenizer, student_tokenizer, settings.teacher)
    dtype = precision_dtype(precision) if precision in ("bf16", "fp16") else None
    teacher, _ = load_for_inference(settings.teacher, device, dtype=dtype)
    if context is not None and teacher.config.block_size < context:
        raise UserError(f"the teacher {settings.teacher} reads at most {teacher.config.block_size} tokens and the "
                        f"student trains on {context}: lower --context to {teacher.config.block_size}")
    return teacher


def check_teacher_tokenizer(teacher_tokenizer, student_tokenizer, teacher: str) -> None:
    if teacher_tokenizer.identity != student_tokenizer.identity:
        raise UserError(
            f"the teacher {teacher} uses another tokenizer ({teacher_tokenizer.name}, "
            f"{teacher_tokenizer.identity[:19]}…) than the student ({student_tokenizer.name}, "
            f"{student_tokenizer.identity[:19]}…): distillation compares next-token distributions id by id, so "
            "choose a teacher with the student's tokenizer")


def distillation_objective(cfg) -> DistillationObjective:
    """The objective for a TrainConfig with `teacher` set (the teacher loads in the Trainer's setup)."""
    return DistillationObjective(DistillSettings(cfg.teacher, cfg.distill_alpha, cfg.distill_temperature))


def check_teacher_for(cfg, student_tokenizer) -> None:
    """Before any weights load: the teacher's tokenizer must be the student's."""
    from pocketlm.tokenizer import load_tokenizer

    if cfg.teacher:
        check_teacher_tokenizer(load_tokenizer(cfg.teacher), student_tokenizer, cfg.teacher)
