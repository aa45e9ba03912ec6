"""The compression axis of a study: `quantize` (a post-training format from pocketlm quantize: fp16, bf16,
fp8, int8, int4, nf4, ...) and `qat` (quantization-aware fine-tuning, `finetune --qat`, a training knob in
knobs.py). A quantized cell is measured on its quantized folder DIR/CELL/quantized-FORMAT, and its
size_bytes is that folder's weights on disk (size_bytes_trained keeps the trained checkpoint's)."""

from __future__ import annotations

from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.study import knobs as K


def _check(value) -> None:
    from pocketlm.compress.formats import FORMATS

    if value not in FORMATS:
        raise UserError(f"quantize {value!r} is not a format: choose one of {', '.join(FORMATS)}")


def _apply(run: Path, source: Path, knobs: dict, log) -> dict:
    from pocketlm.compress.api import quantize
    from pocketlm.compress.folder import folder_bytes

    fmt = knobs["quantize"]
    out = run / f"quantized-{fmt}"
    if not (out / "config.json").exists():
        quantize(source, fmt, out, overwrite=True, progress=False)
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"size_bytes": weights, "quantized_folder_bytes": folder_bytes(out), "_model_source": str(out)}


def register() -> None:
    K.register_post_training(K.Knob("quantize", "str", "quantize the trained model to this format after "
                                    "training (pocketlm quantize); measures use the quantized model",
                                    optional=True), _check, _apply)
