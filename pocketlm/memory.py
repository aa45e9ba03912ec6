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
POCKETLM_ALLOCATOR=glibc (or the older POCKETLM_TUNE_ALLOCATOR=0) is set. Python users call it
themselves (or set GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=
18446744073709551615 before starting Python).

tcmalloc does better still where it is installed: glibc's heap fragments under training's mix of
long-lived activations and short-lived temporaries (measured: at the end of a LoRA forward pass,
1.4 GB of live tensors sat in a 2.6 GB heap), while tcmalloc hands free spans back. So the `pocketlm`
command, started from a shell, re-executes itself once with tcmalloc preloaded when it finds one
(`reexec_with_tcmalloc`). POCKETLM_ALLOCATOR picks: auto (the default: tcmalloc if installed, else
tuned glibc), tcmalloc (required: an error if missing), glibc-tuned, glibc.

Measured with benchmarks/bench_train.py (gpt2, batch 8 x 256, 2-core Xeon): plain glibc page-faults
~355k times per step (1.5 s of kernel time); tuned, none; +4-14% tokens/s, +2-4% peak RSS. tcmalloc
(LD_PRELOAD of find_tcmalloc()) is about as fast and holds ~8% less peak RSS there; it needs a system
package and a preload before the process starts, hence the CLI's re-execution rather than a dependency.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import signal
import sys

from pocketlm.errors import UserError

ALLOCATOR_ENV = "POCKETLM_ALLOCATOR"  # auto | tcmalloc | glibc-tuned | glibc
ALLOCATOR_CHOICES = ("auto", "tcmalloc", "glibc-tuned", "glibc")
OPT_OUT_ENV = "POCKETLM_TUNE_ALLOCATOR"  # older switch: 0 means plain glibc
REEXEC_MARK = "_POCKETLM_ALLOCATOR_REEXEC"  # set in the re-executed process: never exec twice

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
    elif not _on_glibc():
        _state = "system"
    elif allocator_choice() == "glibc":
        _state = "glibc"
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
    return preloaded_allocator() or ("glibc" if _on_glibc() else "system")


def _on_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def release_free_memory() -> None:
    """Hand memory that is free inside the allocator back to the kernel, once, before training starts.

    Setting up leaves garbage behind (a checkpoint's buffers; fp32 weights that the trainer has since
    cast to bf16): about 0.25 GB for smollm2-135m. Training would reuse only part of it, so without
    this it stays in the resident set and adds to the peak. Both tuned glibc (no automatic trimming)
    and tcmalloc (gradual release) keep it otherwise. A no-op elsewhere.
    """
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return
    if preloaded_allocator() == "tcmalloc":
        release = getattr(libc, "MallocExtension_ReleaseFreeMemory", None)
        if release is not None:
            release()
    elif _on_glibc():
        libc.malloc_trim(0)


def allocator_choice(environ: os._Environ | dict | None = None) -> str:
    """The POCKETLM_ALLOCATOR setting (see the module doc); POCKETLM_TUNE_ALLOCATOR=0 still means glibc."""
    environ = os.environ if environ is None else environ
    choice = environ.get(ALLOCATOR_ENV, "").strip().lower() or "auto"
    if choice not in ALLOCATOR_CHOICES:
        raise UserError(f"{ALLOCATOR_ENV}={choice!r} is not an allocator: use one of {', '.join(ALLOCATOR_CHOICES)}")
    if choice == "auto" and environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return "glibc"
    return choice


def tcmalloc_environment(environ: os._Environ | dict | None = None) -> dict | None:
    """The environment to re-execute this process in with tcmalloc preloaded, or None when that is not
    wanted (another allocator chosen), not needed (already preloaded; already re-executed) or not
    possible (not Linux, or tcmalloc not installed under auto)."""
    environ = dict(os.environ if environ is None else environ)
    choice = allocator_choice(environ)
    if choice not in ("auto", "tcmalloc") or environ.get(REEXEC_MARK) or preloaded_allocator():
        return None
    path = find_tcmalloc() if platform.system() == "Linux" else None
    if path is None:
        if choice == "tcmalloc":
            raise UserError(f"{ALLOCATOR_ENV}=tcmalloc but tcmalloc is not installed: install it (Debian/Ubuntu: "
                            "apt-get install libgoogle-perftools4) or unset the variable")
        return None
    preload = environ.get("LD_PRELOAD", "").strip()
    environ["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
    environ[REEXEC_MARK] = "1"
    # tcmalloc reports every allocation over 1 GB on stderr by default; loading a model makes several.
    environ.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return environ


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by `python -m pocketlm ARGV` with tcmalloc preloaded, when tcmalloc_environment
    says so; otherwise return. Only for the command line: the allocator must be in place before Python
    starts, and in-process callers (tests, notebooks) keep their process."""
    env = tcmalloc_environment()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # Hold Ctrl-C back across exec (the mask and a pending signal survive it): pocketlm.cli.main lets it
    # through once it can turn it into one line, instead of a traceback from the interpreter's start-up.
    blocked = hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocked else None
    try:
        os.execve(sys.executable, [sys.executable, "-m", "pocketlm", *argv], env)
    finally:  # exec failed (it does not return otherwise): the mask as it was (pocketlm.__main__ may hold it)
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
