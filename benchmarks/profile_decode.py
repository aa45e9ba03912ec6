"""Where decode time goes per token: matmul kernels vs everything else (torch.profiler), batch 1, greedy.

    python benchmarks/profile_decode.py models/smol-int4 [models/smol-int8 ...] [--tokens 48] [--threads N]
    python benchmarks/profile_decode.py --config smollm2-135m --layers 4 --formats fp32,int8,int4   # no weights needed
    python benchmarks/profile_decode.py models/smol-int4 --compile      # the compiled step (generate --compile)

Prints, per model: wall ms/token while profiled, the matmul kernels' share (int8/int4 weight-only kernels and
float matmuls), the output head's top-k refinement, and the eight most expensive ops per token. The rest is
the per-layer work outside the matmuls (norms, rotary embeddings, attention, casts, Python dispatch).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile

KERNELS = ("aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::mm", "aten::addmm",
           "aten::bmm", "aten::linear", "pocketlm_lowbit::int8_mm", "pocketlm_lowbit::int4_mm")


def models(args) -> list[tuple[str, torch.nn.Module]]:
    from pocketlm.io import load_model

    out = [(src, load_model(src)[0]) for src in args.sources]
    if args.config:
        from pocketlm.compress import formats as fm
        from pocketlm.compress.convert import quantize_model
        from pocketlm.model import GPT, get_config

        torch.manual_seed(0)
        overrides = {"n_layer": args.layers} if args.layers else {}
        base = GPT(get_config(args.config, **overrides)).eval()
        for f in args.formats.split(","):
            m = copy.deepcopy(base)
            quantize_model(m, fm.QuantSpec(f), progress=False)
            out.append((f"{args.config} {f} (random)", m))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", help="model folders (e.g. `pocketlm quantize` outputs)")
    p.add_argument("--config", default=None, help="a named config with random weights instead")
    p.add_argument("--layers", type=int, default=None, help="with --config: this many layers")
    p.add_argument("--formats", default="fp32,int8,int4", help="with --config: formats to compare")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="profile the compiled decode step (generate --compile)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pocketlm.generate import SamplingSettings, generate_tokens

    settings = SamplingSettings(max_new_tokens=args.tokens, temperature=0)
    for name, m in models(args):
        idx = torch.randint(0, m.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        generate_tokens(m, idx, settings, eos_id=None, compiled=args.compile)  # warm-up (and the compile)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            generate_tokens(m, idx, settings, eos_id=None, compiled=args.compile)
            wall = time.perf_counter() - t
        ev = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        n = args.tokens
        kern = sum(v for k, v in ev.items() if k in KERNELS)
        print(f"{name}: {wall / n * 1e3:.2f} ms/token (profiled; prefill of {args.prompt_tokens} included), "
              f"matmul kernels {kern / n * 1e3:.2f} ms/token ({100 * kern / wall:.0f}%), head top-k "
              f"{ev.get('aten::topk', 0) / n * 1e3:.3f} ms/token, everything else {100 * (1 - kern / wall):.0f}%")
        top = sorted(ev.items(), key=lambda kv: -kv[1])[:8]
        print("    " + ", ".join(f"{k.removeprefix('aten::')} {v / n * 1e3:.2f}" for k, v in top) + " (ms/token)")


if __name__ == "__main__":
    main()
