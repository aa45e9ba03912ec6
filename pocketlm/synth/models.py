"""Loading the models synth and distillation run without training them (teacher, perplexity reference)."""

from __future__ import annotations

import torch

from pocketlm.errors import UserError


def load_for_inference(source: str, device: str | torch.device = "auto", adapter: str | None = None,
                       dtype: torch.dtype | None = None):
    """(model in eval mode without gradients, tokenizer) for any model SOURCE `generate` accepts."""
    from pocketlm.device import pick_device
    from pocketlm.io import load_model

    device = pick_device(device) if isinstance(device, str) else device
    model, tokenizer = load_model(source, device=device, dtype=dtype)
    if adapter is not None:
        from pathlib import Path

        from pocketlm.io.peft import load_adapter

        if not Path(adapter).is_dir():
            raise UserError(f"adapter {adapter} is not a folder: give the adapter folder a LoRA run saved")
        load_adapter(model, adapter)
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
