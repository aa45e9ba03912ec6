"""The compression table: one folder per format, then what each costs and gains, in one call.

Rows: format, size on disk (and the ratio to the fp32 row or the source's fp32 size), bits/byte and
perplexity on a held-out text, KL divergence and top-1 agreement against the source (pocketlm.eval.compare),
prefill and decode tokens/s at batch 1 and the process's peak resident memory. Speed and memory come from a
fresh process per format (`python -m pocketlm.compress.table FOLDER`), so one format's allocations never
count against another; quality is measured here, with the source loaded once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from pocketlm.compress import formats as fm
from pocketlm.errors import UserError

PROMPT_TOKENS = 64


def _formats(text: str) -> list[str]:
    items = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in items if f not in fm.FORMATS]
    if not items or bad:
        raise UserError(f"--formats {text!r}: each must be one of {', '.join(fm.FORMATS)} (e.g. fp32,bf16,int8,int4)")
    return list(dict.fromkeys(items))


def speed(folder: str | Path, new_tokens: int, prompt_tokens: int = PROMPT_TOKENS) -> dict:
    """Prefill and decode tokens/s of a model folder at batch 1 (greedy, no end-of-text), in this process."""
    from pocketlm.generate import SamplingSettings, generate_tokens
    from pocketlm.io import load_model

    model, _ = load_model(str(folder))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=g)
    with torch.inference_mode():
        model(idx[:, :8], cache=model.new_cache(1, 16))  # warm-up: kernel layouts, first allocations
        cache = model.new_cache(1, prompt_tokens + 1)
        t = time.perf_counter()
        model(idx, cache=cache)
        prefill = prompt_tokens / (time.perf_counter() - t)
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=0)
    t = time.perf_counter()
    out = generate_tokens(model, idx, settings, eos_id=None)
    decode = out.shape[1] / max(1e-9, time.perf_counter() - t - prompt_tokens / prefill)  # prefill excluded
    import resource

    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
            "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _speed_in_subprocess(folder: Path, new_tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pocketlm.compress.table", str(folder), str(new_tokens)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"timing {folder} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compression_table(source: str, formats: str, out: str | Path, *, eval_text: str | Path | None,
                      group_size: int | None = None, scheme: str | None = None, skip=None, overwrite: bool = False,
                      max_tokens: int | None = None, speed_tokens: int = 64, json_out: str | Path | None = None
                      ) -> list[dict]:
    """Quantize SOURCE to every format under OUT/<format>/ and measure each; returns the rows."""
    from pocketlm.atomic import atomic_write_json
    from pocketlm.compress.api import check_out, quantize
    from pocketlm.eval.compare import compare_on_text
    from pocketlm.eval.likelihood import evaluate_text, read_text_file
    from pocketlm.io import load_model

    names = _formats(formats)
    if eval_text is None:
        raise UserError("--formats writes a compression table: give --eval TEXT (a held-out UTF-8 text) to score on")
    text = read_text_file(eval_text)
    out = Path(out)
    for name in names:  # every mistake before the first folder is written
        check_out(out / name, overwrite, source)
    baseline, tokenizer = load_model(source)
    baseline = baseline.float().eval()
    rows = []
    for name in names:
        result = quantize(source, name, out / name, group_size=group_size, scheme=scheme, skip=skip,
                          overwrite=overwrite)
        model, tok = load_model(out / name)
        with torch.no_grad():
            lik = evaluate_text(model, tok, text, max_tokens=max_tokens)
            dist = compare_on_text(model, baseline, tok, tokenizer, text, max_tokens=max_tokens)
        del model
        row = {"format": name, "size_bytes": result["size_bytes"], "ratio_to_fp32": result["ratio_to_fp32"],
               "bits_per_byte": lik.bits_per_byte, "perplexity": lik.perplexity,
               "kl_divergence": dist["kl_divergence"], "top1_agreement": dist["top1_agreement"],
               "tokens_scored": lik.tokens, "folder": str(out / name)}
        if speed_tokens > 0:
            row.update(_speed_in_subprocess(out / name, speed_tokens))
        rows.append(row)
        print(f"pocketlm quantize: {name}: {row['size_bytes'] / 1e6:.1f} MB, {row['bits_per_byte']:.4f} bits/byte",
              file=sys.stderr)
    if json_out is not None:
        atomic_write_json(json_out, {"source": str(source), "eval_text": str(eval_text), "rows": rows})
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'format':<7}{'MB':>9}{'x fp32':>8}{'bits/byte':>11}{'ppl':>9}{'KL':>10}{'top-1':>7}"
            f"{'prefill/s':>11}{'decode/s':>10}{'peak MB':>9}")
    lines = [head]
    for r in rows:
        sp = (f"{r['prefill_tokens_per_s']:>11.1f}{r['decode_tokens_per_s']:>10.1f}{r['peak_memory_bytes'] / 1e6:>9.0f}"
              if "decode_tokens_per_s" in r else f"{'-':>11}{'-':>10}{'-':>9}")
        lines.append(f"{r['format']:<7}{r['size_bytes'] / 1e6:>9.1f}{r['ratio_to_fp32']:>8.3f}{r['bits_per_byte']:>11.4f}"
                     f"{r['perplexity']:>9.2f}{r['kl_divergence']:>10.5f}{r['top1_agreement']:>7.3f}{sp}")
    return "\n".join(lines)


if __name__ == "__main__":  # the speed probe, in a process of its own (see _speed_in_subprocess)
    print(json.dumps(speed(sys.argv[1], int(sys.argv[2]))))
