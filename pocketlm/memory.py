"""Host memory allocator tuning for CPU training.

Training frees and re-allocates the same large tensors (activations, logits, gradients: tens to
hundreds of MB each) every step. glibc's malloc serves requests above its mmap threshold (at most
32 MB) with a fresh mmap and returns them with munmap on free, so every step page-faults hundreds of
MB of zeroed pages back in from the kernel; freed heap memory above M_TRIM_THRESHOLD is also handed
back. On a small CPU that costs a large share of training throughput (see benchmarks/bench_train.py).

`tune_allocator()` keeps freed memory in the process instead: mmap is switched off for allocations
(M_MMAP_MAX=0), so big blocks come from the heap and are reused, and the heap is never trimmed.
Peak resident memory stays at the high-water mark, which a training process reaches anyway.

It is a no-op when tcmalloc or jemalloc is preloaded (they cache on their own), off glibc, and when
POCKETLM_TUNE_ALLOCATOR=0 is set in the environment. The pocketlm CLI calls it at start; Python users
call it themselves (or set GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=
18446744073709551615 before starting Python).

Measured with benchmarks/bench_train.py (gpt2, batch 8 x 256, 2-core Xeon): plain glibc page-faults
~355k times per step (1.5 s of kernel time); tuned, none; +4-14% tokens/s, +2-4% peak RSS. tcmalloc
(LD_PRELOAD of find_tcmalloc()) is about as fast and holds ~8% less peak RSS, but needs a system
package and a preload before the process starts, so it stays an option rather than the default.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform

OPT_OUT_ENV = "POCKETLM_TUNE_ALLOCATOR"

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_state: str | None = None  # what tune_allocator did in this process


def preloaded_allocator() -> str | None:
    """'tcmalloc' or 'jemalloc' if one replaced malloc in this process (LD_PRELOAD), else None."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return None


def find_tcmalloc() -> str | None:
    """Path of an installed tcmalloc (Debian/Ubuntu: apt-get install libgoogle-perftools4), or None.
    Use it as `LD_PRELOAD=$(path) pocketlm ...`; pocketlm does not need it."""
    for pattern in ("/usr/lib/*/libtcmalloc.so.4", "/usr/lib/*/libtcmalloc_minimal.so.4",
                    "/usr/lib/libtcmalloc*.so*", "/usr/local/lib/libtcmalloc*.so*"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def tune_allocator() -> str:
    """Make glibc malloc keep and reuse freed memory (see the module doc). Returns what is in effect:
    'glibc-tuned', 'tcmalloc'/'jemalloc' (preloaded, left alone), 'glibc' (opted out) or 'system'
    (not glibc). Safe to call more than once."""
    global _state
    if _state is not None:
        return _state
    preloaded = preloaded_allocator()
    if preloaded:
        _state = preloaded
    elif os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _state = "glibc" if platform.libc_ver()[0] == "glibc" else "system"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = "system"
    else:
        libc = ctypes.CDLL(None)
        # mallopt takes an int; glibc converts the threshold to size_t, so -1 means "never trim".
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
        _state = "glibc-tuned" if ok else "glibc"
    return _state


def allocator_in_effect() -> str:
    """A short name for the allocator this process uses, for logs and benchmark tables."""
    if _state is not None:
        return _state
    return preloaded_allocator() or ("glibc" if platform.libc_ver()[0] == "glibc" else "system")
