"""Activation checkpointing by a memory budget: `--max-memory 2GB` recomputes the fewest blocks that fit.

A training step's memory is what is there before it (weights, the runtime; on a CPU the process's resident
set) plus the gradients and AdamW's two moments of the trainable parameters, plus the activations the
forward pass saves for backward. Recomputing a block in backward keeps only its input, so with k of n
blocks recomputed the activations are (n - k) x the saved bytes of one block + k x its input, plus the
head's and one block's transient during backward. `plan_recompute` measures the saved bytes of one block
and of the head on the run's own micro-batch shape (one forward pass each, through saved-tensor hooks, so
the figure is what this model, precision and LoRA setup really keep), then picks the least k that fits.

The model recomputes its first k blocks (`GPT.activation_checkpointing`: True = all, an int = that many).
"""

from __future__ import annotations

import re
import sys

import torch

from pocketlm.device import autocast
from pocketlm.errors import UserError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from '2GB', '1.5 GiB', '800MB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b?|b)?\s*", str(text), re.IGNORECASE)
    unit = (m.group(2) or "").lower() if m else None
    if unit is not None and unit and not unit.endswith("b"):
        unit += "b"
    if m is None or unit not in _UNITS:
        raise UserError(f"--max-memory {text!r} is not a size: write it like 2GB, 1.5GiB or 800MB")
    return int(float(m.group(1)) * _UNITS[unit])


def _saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while fn() runs, leaving out `exclude` (weights, the
    input): what the forward pass keeps alive for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes(model, micro_batch: int, context: int, device: torch.device, precision: str) -> dict:
    """Measured saved bytes of one block and of the head (final norm + loss), and one block's input, for a
    (micro_batch, context) batch in training mode."""
    d = model.config.n_embd
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    x = torch.randn(micro_batch, context, d, device=device, requires_grad=True)
    rope = None if model.config.family == "gpt2" else model._rope(0, context, device)
    targets = torch.zeros(micro_batch, context, dtype=torch.long, device=device)
    block = model.transformer.h[0]
    was_training = model.training
    model.train()
    try:
        with autocast(device, precision):
            per_block = _saved_bytes(lambda: block(x, rope, None, 0), weights | {x.untyped_storage().data_ptr()})
            head = _saved_bytes(lambda: model._chunked_loss(model.transformer.ln_f(x), targets),
                                weights | {x.untyped_storage().data_ptr()})
    finally:
        model.train(was_training)
    return {"block": per_block, "head": head, "block_input": x.numel() * x.element_size()}


def resident_bytes(device: torch.device) -> int:
    """What the process holds now: CUDA allocated bytes, else the resident set (Linux)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plan_recompute(model, *, budget: int, micro_batch: int, context: int, device: torch.device,
                   precision: str, before_training: int | None = None) -> tuple[int, dict]:
    """(blocks to recompute, the estimate): the least k whose estimated peak fits `budget` bytes.
    `before_training`: bytes held before the first step (default: measured now)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # Gradients as the parameters, AdamW's exp_avg and exp_avg_sq in fp32.
    training_state = trainable + 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    act = activation_bytes(model, micro_batch, context, device, precision)
    before = resident_bytes(device) if before_training is None else before_training
    base = before + training_state
    n = len(model.transformer.h)

    def peak(k: int) -> int:
        transient = act["block"] + act["head"]  # backward of one block while the head's gradient lives
        return base + (n - k) * act["block"] + k * act["block_input"] + transient

    plan = {"budget": budget, "blocks": n, "before_training": before, "training_state": training_state,
            **{f"{k}_bytes": v for k, v in act.items()}}
    for k in range(n + 1):
        if peak(k) <= budget:
            return k, {**plan, "recompute": k, "estimated_peak": peak(k)}
    raise UserError(f"--max-memory {budget / 1e9:.2f}GB is below the ~{peak(n) / 1e9:.2f}GB this run needs even "
                    f"with every block recomputed: raise it, or lower --micro-batch or --context")


def apply_memory_budget(model, cfg, device: torch.device, precision: str, context: int) -> None:
    """Set model.activation_checkpointing from cfg.max_memory (when given) and say what was chosen."""
    if not cfg.max_memory:
        return
    k, plan = plan_recompute(model, budget=parse_size(cfg.max_memory), micro_batch=cfg.micro_batch,
                             context=context, device=device, precision=precision)
    model.activation_checkpointing = True if k == plan["blocks"] else k
    print(f"--max-memory {cfg.max_memory}: recomputing {k} of {plan['blocks']} blocks in backward (estimated peak "
          f"{plan['estimated_peak'] / 1e9:.2f} GB; one block keeps {plan['block_bytes'] / 1e6:.0f} MB for "
          f"backward)", file=sys.stderr)
