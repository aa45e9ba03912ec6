"""Decoding and prefill speed at batch 1: pocketlm fp32/bf16/int8/int4 vs transformers vs llama.cpp.

    python benchmarks/bench_decode.py                       # smollm2-135m, every variant that is installed
    python benchmarks/bench_decode.py --model gpt2-tiny --variants pocketlm-fp32,pocketlm-int8   # a quick check

Every variant decodes --new-tokens (128) greedy tokens after the same --prompt-tokens (64) prompt, with no
end-of-text stop, alternating variants in each repeat so all see the same machine load. "decode tok/s"
counts the tokens after the first one over the time after the first one (prefill excluded), the median of
--repeats; "prefill tok/s" times a --prefill-tokens (512) prompt. Variants:

  pocketlm-fp32 / pocketlm-bf16     the model in that dtype (KV-cache loop of pocketlm.generate)
  pocketlm-int8 / pocketlm-int4     `pocketlm quantize` folders (int8 and int4 group-32 kernels)
  pocketlm-*-compiled               the same with the decode step compiled (`generate --compile`); the
                                    compile runs before timing and its seconds are printed
  transformers-fp32 / -bf16         AutoModelForCausalLM.generate on the same weights (an HF folder)
  llamacpp-q4_1                     llama.cpp (llama-cpp-python) on the built-in Q4_1 GGUF of smollm2-135m
  llamacpp-q8_0                     llama.cpp on the Q8_0 export of the pocketlm int8 folder (same weights)

llama-cpp-python builds llama.cpp from source: `pip install -e '.[bench]'` (or `pip install
llama-cpp-python`); when it is missing, its rows say so. With the built-in base (weights: builtin) the
weights are SmolLM2's; for other names (weights: random) a seeded random init. The memory-bandwidth bound:
every decoded token reads every weight once, so tokens/s <= bandwidth / bytes of weights; "% of bound" uses
this machine's measured read bandwidth (a sum over a 512 MB buffer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("pocketlm-fp32", "pocketlm-bf16", "pocketlm-int8", "pocketlm-int4", "pocketlm-fp32-compiled",
            "pocketlm-bf16-compiled", "pocketlm-int8-compiled", "pocketlm-int4-compiled", "transformers-fp32",
            "transformers-bf16", "llamacpp-q4_1", "llamacpp-q8_0")
TEXT = ("The history of the old city begins with a small harbour on the northern coast, where fishermen "
        "traded salt and wool with merchants from the islands. Over three centuries the town grew around the "
        "market square, and its walls were rebuilt after every war. ")


def measured_bandwidth_gbs(n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """This machine's read bandwidth: the best of a few sums over a buffer far larger than any cache."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, shared tensors once (what one decoded token reads, about)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class Pocketlm:
    def __init__(self, model, threads: int, compiled: bool = False) -> None:
        self.model, self.compiled = model.eval(), compiled
        self.compile_seconds: dict[int, float] = {}  # per cache length: the first compile of each

    def decode(self, ids: list[int], n: int) -> tuple[list[int], float]:
        from pocketlm.generate import SamplingSettings, compile_decode, generate_tokens

        if self.compiled and len(ids) + n not in self.compile_seconds:
            self.compile_seconds[len(ids) + n] = compile_decode(self.model, 1, len(ids) + n)
        stamps: list[float] = []
        settings = SamplingSettings(max_new_tokens=n, temperature=0)
        out = generate_tokens(self.model, torch.tensor([ids]), settings, eos_id=None, compiled=self.compiled,
                              on_step=lambda rows, toks: stamps.append(time.perf_counter()))
        return out[0].tolist(), (n - 1) / (stamps[-1] - stamps[0])

    def prefill(self, ids: list[int]) -> float:
        with torch.inference_mode():
            cache = self.model.new_cache(1, len(ids))
            t = time.perf_counter()
            self.model(torch.tensor([ids]), cache=cache)
            return len(ids) / (time.perf_counter() - t)


class Transformers:
    def __init__(self, folder: Path, dtype: torch.dtype, eos: int | None) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.pad = eos if eos is not None else 0

    def decode(self, ids: list[int], n: int) -> tuple[list[int], float]:
        from transformers import GenerationConfig, LogitsProcessorList

        stamps: list[float] = []

        def stamp(input_ids, scores):  # called once per new token, after the forward that produced it
            stamps.append(time.perf_counter())
            return scores

        config = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None,
                                  pad_token_id=self.pad, bos_token_id=None)
        idx = torch.tensor([ids])
        with torch.inference_mode():
            out = self.model.generate(idx, generation_config=config, attention_mask=torch.ones_like(idx),
                                      logits_processor=LogitsProcessorList([stamp]))
        end = time.perf_counter()
        return out[0, len(ids):].tolist(), (n - 1) / (end - stamps[0]) if stamps else float("nan")

    def prefill(self, ids: list[int]) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            self.model(torch.tensor([ids]), use_cache=True)
            return len(ids) / (time.perf_counter() - t)


class LlamaCpp:
    def __init__(self, path: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_batch=512, verbose=False)

    def decode(self, ids: list[int], n: int) -> tuple[list[int], float]:
        tokens, stamps = [], []
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(tok))
            if len(tokens) == n:
                break
        return tokens, (n - 1) / (stamps[-1] - stamps[0])

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t)


def build(args, tmp: Path) -> tuple[dict, dict, dict, list[int], dict]:
    """(runners, weight bytes, notes, prompt ids, info): one runner per available variant."""
    from pocketlm.compress.api import quantize
    from pocketlm.io import save_model
    from pocketlm.io.builtins import BUILTIN_BASES
    from pocketlm.model import GPT, get_config
    from pocketlm.tokenizer import load_tokenizer

    builtin = args.weights == "builtin" or (args.weights == "auto" and args.model in BUILTIN_BASES)
    if builtin:
        from pocketlm.io import load_model

        model, tok = load_model(args.model)
    else:
        torch.manual_seed(0)
        model, tok = GPT(get_config(args.model)).eval(), load_tokenizer(get_config(args.model).tokenizer)
    fp32_dir = save_model(model.float(), tok, tmp / "fp32")
    ids = (tok.encode(TEXT) * (1 + args.prefill_tokens // 20))[: args.prefill_tokens]
    runners, nbytes, notes = {}, {}, {}
    wanted = args.variants.split(",")
    for v in wanted:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v}: choose from {', '.join(VARIANTS)}")
    ctx = args.prompt_tokens + args.new_tokens
    for v in wanted:
        kind, fmt, *compiled = v.split("-")
        try:
            if kind == "pocketlm":
                if fmt in ("int8", "int4"):
                    if not (tmp / fmt).exists():  # the compiled variant loads the same folder
                        quantize(fp32_dir, fmt, tmp / fmt, progress=False)
                    from pocketlm.io import load_model

                    m = load_model(tmp / fmt)[0]
                else:
                    import copy

                    m = copy.deepcopy(model).to(torch.bfloat16 if fmt == "bf16" else torch.float32)
                runners[v], nbytes[v] = Pocketlm(m, args.threads, compiled=bool(compiled)), weight_bytes(m)
            elif kind == "transformers":
                r = Transformers(fp32_dir, torch.bfloat16 if fmt == "bf16" else torch.float32, tok.eos_id)
                runners[v], nbytes[v] = r, weight_bytes(r.model)
            else:
                import llama_cpp  # noqa: F401 - fail early with the reason in the notes

                path = gguf_file(fmt, builtin, model, tok, fp32_dir, tmp)
                runners[v], nbytes[v] = LlamaCpp(path, args.threads, max(ctx, args.prefill_tokens) + 8), path.stat().st_size
        except ImportError as exc:
            notes[v] = f"not measured: {exc.name or exc} is not installed (pip install -e '.[bench]')"
    return runners, nbytes, notes, ids, {"builtin": builtin, "params": model.num_parameters()}


def gguf_file(fmt: str, builtin: bool, model, tok, fp32_dir: Path, tmp: Path) -> Path:
    """q4_1: the built-in GGUF itself (else an export); q8_0: the pocketlm int8 folder exported losslessly."""
    if fmt == "q4_1" and builtin:
        from pocketlm.io.gguf import smollm2_gguf_path

        return Path(smollm2_gguf_path())
    if fmt == "q8_0":
        from pocketlm.compress.api import quantize
        from pocketlm.compress.gguf import export_quantized_gguf
        from pocketlm.io import load_model

        if not (tmp / "int8").exists():
            quantize(fp32_dir, "int8", tmp / "int8", progress=False)
        return export_quantized_gguf(load_model(tmp / "int8")[0], tok, tmp / "q8_0.gguf", "q8_0")
    from pocketlm.io.gguf_write import write_gguf

    return write_gguf(model, tok, tmp / f"{fmt}.gguf", dtype=fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a built-in base or a named config (smollm2-135m)")
    parser.add_argument("--weights", choices=("auto", "builtin", "random"), default="auto")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and llama.cpp (torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        runners, nbytes, notes, ids, info = build(args, Path(tmp))
        prompt = ids[: args.prompt_tokens]
        for r in runners.values():  # warm-up: first-call allocations, kernel layouts, and the prefill's
            r.decode(prompt, 4)      # shapes (a first long prompt allocates and builds oneDNN primitives)
            r.prefill(ids)
        rates = {v: [] for v in runners}
        prefill = {v: [] for v in runners}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for v, r in runners.items():
                tokens[v], rate = r.decode(prompt, args.new_tokens)
                rates[v].append(rate)
                prefill[v].append(r.prefill(ids))
    report(args, runners, nbytes, notes, info, rates, prefill, tokens)


def report(args, runners, nbytes, notes, info, rates, prefill, tokens) -> None:
    bandwidth = measured_bandwidth_gbs()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"decode benchmark: {args.model} ({info['params']:,} parameters, "
          f"{'built-in weights' if info['builtin'] else 'random weights'}), batch 1, greedy, prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens; prefill of {args.prefill_tokens} tokens")
    print(f"threads {args.threads}, {os.cpu_count()} CPUs, load average {load:.2f}, repeats {args.repeats}, "
          f"measured read bandwidth {bandwidth:.1f} GB/s")
    from pocketlm.compress import kernels

    print(f"int8/int4 decoding on {kernels.status()}")
    print()
    print(f"{'variant':<24}{'decode tok/s':>13}{'best':>8}{'prefill tok/s':>15}{'weights MB':>12}{'bound tok/s':>13}"
          f"{'% of bound':>12}{'same tokens':>13}")
    ref = tokens.get("pocketlm-fp32")
    med = {v: statistics.median(r) for v, r in rates.items()}
    for v in VARIANTS:
        if v not in runners:
            if v in notes:
                print(f"{v:<24}{notes[v]}")
            continue
        bound = bandwidth * 1e9 / nbytes[v]
        same = "-" if ref is None else f"{_agree(ref, tokens[v])}/{len(ref)}"
        print(f"{v:<24}{med[v]:>13.1f}{max(rates[v]):>8.1f}{statistics.median(prefill[v]):>15.1f}"
              f"{nbytes[v] / 1e6:>12.1f}{bound:>13.1f}{100 * med[v] / bound:>11.0f}%{same:>13}")
    print()
    pairs = [("pocketlm-int8", "pocketlm-fp32", "decode", "goal >= 3"),
             ("pocketlm-int8-compiled", "pocketlm-fp32", "decode", "goal >= 3"),
             ("pocketlm-int8-compiled", "pocketlm-fp32-compiled", "decode", ""),
             ("pocketlm-int4", "llamacpp-q4_1", "decode", "goal >= 1.0"),
             ("pocketlm-int4-compiled", "llamacpp-q4_1", "decode", "goal >= 1.0"),
             ("pocketlm-int8", "transformers-fp32", "prefill", "goal >= 1.5"),
             ("pocketlm-fp32", "transformers-fp32", "decode", ""),
             ("pocketlm-bf16-compiled", "transformers-bf16", "decode", "")]
    for a, b, what, goal in pairs:
        if a in med and b in med:
            x = med[a] / med[b] if what == "decode" else statistics.median(prefill[a]) / statistics.median(prefill[b])
            print(f"{what} {a} / {b}: {x:.2f}x {goal}")
        else:
            print(f"{what} {a} / {b}: not measured ({', '.join(notes.get(v, 'not selected') for v in (a, b) if v not in med)})")
    print("same tokens: greedy tokens identical to pocketlm-fp32 before the first difference")
    for v, r in runners.items():
        if getattr(r, "compile_seconds", None):
            print(f"{v}: compiled in " + ", ".join(f"{t:.1f} s (cache of {n})" for n, t in r.compile_seconds.items()))


def _agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    main()
