"""How far a model's next-token distributions are from a baseline's on the same text: KL and top-1 agreement.

`kl_divergence` is KL(baseline || model) in nats per token, averaged over every scored position: the
information the model loses about the baseline's prediction (Hinton et al.'s distillation target, and
what llama.cpp's `perplexity --kl-divergence` reports for quantized models). `top1_agreement` is the share of
positions where both models rank the same token first. The text is cut into disjoint windows of `context`
tokens (after the BOS/end-of-text start token, as pocketlm.eval.likelihood does), and both models see exactly
the same windows; the logits are compared in fp32, a window at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pocketlm.device import model_device
from pocketlm.errors import UserError

DEFAULT_CONTEXT = 1024  # two (window x vocabulary) fp32 logits at a time: 400 MB for SmolLM2 at 1024


def _windows(ids: list[int], start: int | None, context: int) -> list[torch.Tensor]:
    seq = ([start] if start is not None else []) + list(ids)
    return [torch.tensor(seq[b:b + context + 1]) for b in range(0, max(1, len(seq) - 1), context)
            if len(seq[b:b + context + 1]) >= 2]


@torch.no_grad()
def compare_models(model, baseline, ids: list[int], *, start: int | None, context: int | None = None) -> dict:
    """{"kl_divergence", "top1_agreement", "tokens"} of `model` against `baseline` on token ids `ids`."""
    ctx = min(context or DEFAULT_CONTEXT, model.config.block_size, baseline.config.block_size)
    vocab = min(model.config.vocab_size, baseline.config.vocab_size)
    kl_total, agree, count = 0.0, 0, 0
    for window in _windows(ids, start, ctx):
        x = window[:-1][None]
        logp = F.log_softmax(model(x.to(model_device(model)))[0][0, :, :vocab].float().cpu(), dim=-1)
        logq = F.log_softmax(baseline(x.to(model_device(baseline)))[0][0, :, :vocab].float().cpu(), dim=-1)
        kl_total += float((logq.exp() * (logq - logp)).sum())
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        count += x.shape[1]
    if count == 0:
        raise UserError("nothing to compare: the text has no tokens")
    return {"kl_divergence": kl_total / count, "top1_agreement": agree / count, "tokens": count,
            "context": ctx}


def compare_on_text(model, baseline, tokenizer, baseline_tokenizer, text: str, *, context: int | None = None,
                    max_tokens: int | None = None) -> dict:
    """compare_models on a text; both models must share a tokenizer (else the distributions do not align)."""
    if tokenizer.identity != baseline_tokenizer.identity:
        raise UserError("KL divergence and top-1 agreement need the model and --baseline to share a tokenizer: "
                        "compare a quantized model with the model it was made from")
    from pocketlm.eval.likelihood import start_token

    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return compare_models(model, baseline, ids, start=start_token(tokenizer), context=context)


def model_size_bytes(source: str | Path) -> int | None:
    """Size on disk of a model source's weights and files: a folder (a run's checkpoint without its trainer
    state), a .gguf file, or a built-in base's file; None where no file stands for it (a Hub id)."""
    from pocketlm.io.builtins import BUILTIN_BASES
    from pocketlm.io.sources import resolve_model_dir, resolve_source

    path = Path(str(source)).expanduser()
    if not path.exists():
        try:
            kind, resolved = resolve_source(str(source))
            path = BUILTIN_BASES[str(source)][0]() if kind == "builtin" else resolved
        except UserError:
            return None
        if path is None:
            return None
    if path.is_dir():
        path = resolve_model_dir(path)
    if path.is_file():
        return path.stat().st_size
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith("trainer_state.")]
    return sum(p.stat().st_size for p in files)
