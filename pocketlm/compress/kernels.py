"""pocketlm's own low-bit CPU kernels (lowbit.cpp): int8 and int4 weight-only matmuls for decoding.

PyTorch's CPU kernels for these (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) left a compiled int4
token kernel-bound at about the speed of llama.cpp, and int8 no faster than int4. lowbit.cpp does what
llama.cpp does on AVX-512 VNNI CPUs: each activation row is quantized to int8 per 32 columns and one
`vpdpbusd` multiplies 64 weight bytes by 4 activation bytes. Measured on smollm2's layers at batch 1 it is
4-9x faster than PyTorch's kernels (benchmarks/bench_decode.py shows what that gives a whole token).

The source is compiled on first use for the machine it runs on (g++ -march=native, ~10 s) into
~/.cache/pocketlm/kernels (POCKETLM_KERNEL_CACHE), keyed by the source, PyTorch's version and the CPU's
flags, and written under a temporary name first. Where a CPU lacks AVX-512 VNNI, no compiler is found, or
POCKETLM_LOWBIT=0, `available()` is False and the layers keep PyTorch's kernels: correct everywhere.
`python -m pocketlm.compress.kernels` builds it now and says which.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lowbit.cpp")
NEEDS = ("avx512f", "avx512bw", "avx512_vnni")  # /proc/cpuinfo flags
_STATE: dict = {}  # "ok": bool, "why": str


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("POCKETLM_KERNEL_CACHE") or Path.home() / ".cache" / "pocketlm" / "kernels"
    return Path(root)


def _compile(out: Path) -> None:
    from torch.utils.cpp_extension import include_paths

    lib = Path(torch.__file__).parent / "lib"
    cmd = [os.environ.get("CXX", "g++"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-I{p}" for p in include_paths()), str(SOURCE), f"-L{lib}", "-lc10", "-ltorch_cpu",
           f"-Wl,-rpath,{lib}", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        errors = [ln for ln in done.stderr.splitlines() if "error" in ln]
        raise RuntimeError((errors or done.stderr.splitlines() or ["no output"])[0][:300])


def _load() -> tuple[bool, str]:
    if os.environ.get("POCKETLM_LOWBIT", "1") == "0":
        return False, "off (POCKETLM_LOWBIT=0)"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"no kernel for {platform.system()} {platform.machine()}"
    flags = _cpu_flags()
    missing = [f for f in NEEDS if f not in flags]
    if missing:
        return False, f"this CPU lacks {', '.join(missing)}"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return False, f"no C++ compiler ({cxx}) to build it"
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(sorted(flags)).encode()
                         + cxx.encode()).hexdigest()[:16]
    target = _cache_dir() / key / "lowbit.so"
    if not target.exists():
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            _compile(Path(tmp))
            os.replace(tmp, target)  # a build killed halfway never leaves a library that looks built
        except (RuntimeError, OSError) as e:  # a compiler error, an unwritable cache: PyTorch's kernels
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            return False, f"build failed: {e}"
    torch.ops.load_library(str(target))

    @torch.library.register_fake("pocketlm_lowbit::int8_mm")
    def _(x, w, s, n):  # the output's shape, for torch.compile
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("pocketlm_lowbit::int4_mm")
    def _(x, w, s, z, n):
        return x.new_empty(x.shape[0], n)

    return True, f"built ({target})"


def available() -> bool:
    """Whether the kernels are loaded (building them on first call)."""
    if "ok" not in _STATE:
        _STATE["ok"], _STATE["why"] = _load()
    return _STATE["ok"]


def status() -> str:
    """One line: which kernels the quantized layers decode with, and why."""
    return ("pocketlm VNNI kernels: " if available() else "PyTorch's kernels: ") + _STATE["why"]


# -- layouts (made once per layer; see lowbit.cpp) ----------------------------------------------------
def _pad_rows(t: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    return torch.cat((t, t.new_full((rows, *t.shape[1:]), value))) if rows else t


def _per_block(t: torch.Tensor, pad: int) -> torch.Tensor:
    """[N, K/G] scales (or zero points) -> [ceil(N/16), K/G, 16], zero for padded rows."""
    t = _pad_rows(t.float().reshape(t.shape[0], -1), pad, 0.0)
    return t.view(t.shape[0] // 16, 16, -1).permute(0, 2, 1).contiguous()


def int8_layout(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [N, K] and scales [N, K/G] or [N] -> (u8 [N/16, K/4, 16, 4] holding q + 128, scales)."""
    n, k = q.shape
    pad = -n % 16
    u = _pad_rows((q.to(torch.int16) + 128).to(torch.uint8), pad, 128)
    return u.view(-1, 16, k // 4, 4).permute(0, 2, 1, 3).contiguous(), _per_block(scales, pad)


def int4_layout(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int4 codes [N, K] in [0, 15] -> (u8 [N/16, K/32, 4, 16, 4]: per 32 columns, byte j of a row's 4-byte
    chunk c holds column 4c + j in its low nibble and 16 + 4c + j in its high one; scales; zero points)."""
    n, k = codes.shape
    pad = -n % 16
    c = _pad_rows(codes.to(torch.uint8), pad, 8).view(-1, 16, k // 32, 2, 4, 4)
    packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).contiguous()
    return packed, _per_block(scales, pad), (_per_block(zeros, pad) if zeros is not None else None)


def fits(in_features: int, group_size: int | None) -> bool:
    """Whether a layer's shape suits the kernels: K a multiple of 32 and groups of 32 columns or more."""
    g = in_features if group_size is None else group_size
    return in_features % 32 == 0 and g % 32 == 0 and in_features % g == 0


if __name__ == "__main__":
    print(status())
