"""The LoRA step the CPU benchmarks time (bench_contention, bench_compile, profile_lora): the Trainer users
run, on random SmolLM2-135M-shaped weights (the shapes decide the time), LoRA rank 8 on all linear layers,
random token windows, bf16 where the CPU runs it natively (else fp32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def lora_trainer(out: str | Path, *, batch: int, context: int, steps: int, model_name: str = "smollm2-135m",
                 prepare: Callable | None = None, **settings):
    """(a set-up Trainer for `steps` steps of batch x context, its precision); `prepare(model)` runs after the
    adapters are attached (e.g. to compile blocks); `settings` are further TrainConfig fields."""
    import torch

    from pocketlm import lora
    from pocketlm.device import default_precision
    from pocketlm.model import GPT
    from pocketlm.tokenizer import load_tokenizer
    from pocketlm.train import trainer_on_windows

    torch.manual_seed(0)
    model = GPT.from_name(model_name)
    lora.prepare_model(model, "lora", 8, 16, 0.0, "all-linear")
    if prepare is not None:
        prepare(model)
    windows = torch.randint(0, model.config.vocab_size, (steps, batch, context + 1))
    precision = default_precision(torch.device("cpu"))
    trainer = trainer_on_windows(model, load_tokenizer("smollm2"), windows, lr=1e-3, steps=steps, out=out,
                                 device="cpu", precision=precision, **settings)
    return trainer, precision
