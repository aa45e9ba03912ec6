"""Device and precision selection: cuda, then mps, then cpu, unless the user says otherwise."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from pocketlm import names
from pocketlm.errors import UserError


def pick_device(requested: str | None = "auto") -> torch.device:
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UserError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {requested!r} asked for, but CUDA is not available here: use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {requested!r} asked for, but MPS is not available here: use --device cpu")
    return device


PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype a precision name (fp32, bf16, fp16) stands for: the one lookup of it."""
    if precision not in PRECISION_DTYPES:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISION_DTYPES[precision]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this device type, None while autocast is off there: the one place
    layers ask (a layer that casts by hand must cast as autocast would)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's (first) parameter lives on."""
    return next(model.parameters()).device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: bf16 keeps fp32 master weights and optimizer state."""
    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matrix multiplies run about twice as fast as fp32 on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: be conservative
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_precision(device: torch.device) -> str:
    """bf16 autocast where the hardware runs it natively (Ampere+ GPUs, AMX/AVX512-BF16 CPUs), else fp32.

    Weights and optimizer state stay fp32 either way; only matrix multiplies run in bf16.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


INFERENCE_PRECISIONS = names.PRECISIONS  # auto + the dtypes: the same names training takes


def check_inference_precision(precision: str) -> None:
    """A --precision value generate and serve accept, else a one-line error (before any model loads)."""
    if precision not in INFERENCE_PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}: choose one of {', '.join(INFERENCE_PRECISIONS)}")


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype generation and serving hold float weights in. `auto`: bf16 where the hardware runs it
    natively (as training's autocast picks: half the bytes read per decoded token, twice the matmul rate),
    else fp32. Norms and softmax still compute in fp32 (pocketlm.model.RMSNorm, the samplers)."""
    check_inference_precision(precision)
    return precision_dtype(default_precision(device) if precision == "auto" else precision)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: device memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    except ImportError:  # pragma: no cover - Windows
        return 0
