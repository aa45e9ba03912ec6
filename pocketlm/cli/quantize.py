"""`pocketlm quantize SOURCE --format F --out DIR`: a model in fewer bits, as a folder every command loads.

With `--formats F1,F2,... --eval TEXT`, one folder per format under DIR and a compression table
(size, bits/byte, perplexity, KL and top-1 agreement against the source, prefill and decode speed, memory).
"""

from __future__ import annotations

import argparse
import json

from pocketlm.cli.common import HelpFormatter
from pocketlm.names import QUANT_FORMATS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a model (fp16/bf16/fp8/int8/int4/nf4) into a folder every command loads",
        description="Quantize SOURCE (a built-in base, model folder, run directory, .gguf file or cached Hub id) "
                    "and write a model folder whose size on disk reflects the format. int8: symmetric, a scale "
                    "per group of 32 inputs (as Q8_0); int4: groups along the input (sym or asym); fp8: e4m3 "
                    "with a per-channel scale; nf4: QLoRA's NormalFloat. Embeddings and the output head are int8 unless skipped. "
                    "With --formats and --eval, one folder per format and a compression table.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="built-in base, model folder, run directory, .gguf or Hub id")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--format", choices=QUANT_FORMATS, help="the target format")
    which.add_argument("--formats", metavar="F,F,...",
                       help="several formats (e.g. fp32,bf16,fp8,int8,int4): one folder each under --out, "
                            "and the compression table (needs --eval)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (with --formats: their parent)")
    p.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128),
                   help="int8/int4 group size along the input (default 32, or the group size a QAT run trained with)")
    p.add_argument("--scheme", choices=("sym", "asym"), default=None,
                   help="int4: symmetric or asymmetric groups (default sym, or a QAT run's)")
    p.add_argument("--skip", default=None, metavar="LAYERS",
                   help="keep these in float: embeddings, lm_head, or module-name fragments (e.g. mlp,h.0.)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t = p.add_argument_group("compression table (--formats)")
    t.add_argument("--eval", metavar="TEXT", default=None, help="held-out UTF-8 text to score every format on")
    t.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the first N tokens")
    t.add_argument("--speed-tokens", type=int, default=64, metavar="N",
                   help="decode N tokens (after a 64-token prompt) to time each format; 0 skips timing")
    t.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.formats is not None:
        from pocketlm.compress.table import compression_table, format_table

        rows = compression_table(args.source, args.formats, args.out, eval_text=args.eval,
                                 group_size=args.group_size, scheme=args.scheme, skip=args.skip,
                                 overwrite=args.overwrite, max_tokens=args.max_tokens,
                                 speed_tokens=args.speed_tokens, json_out=args.json)
        print(format_table(rows))
        return
    from pocketlm.compress.api import describe, quantize

    result = quantize(args.source, args.format, args.out, group_size=args.group_size, scheme=args.scheme,
                      skip=args.skip, overwrite=args.overwrite)
    print(describe(result))
    print(json.dumps({k: result[k] for k in ("size_bytes", "fp32_bytes", "ratio_to_fp32")}))
