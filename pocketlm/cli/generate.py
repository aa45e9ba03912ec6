"""`pocketlm generate SOURCE`: sample completions of a prompt, streaming the first one.

The flags are the arguments of one library call, pocketlm.generate (pocketlm.generate.generate_from_source);
this module reads the prompt and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pocketlm.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a model",
        description="Sample completions of a prompt with a KV cache. SOURCE is a run directory, a model "
        "folder or a built-in base name. The prompt comes from --prompt, --prompt-file, or stdin when it is "
        "piped (one trailing newline of a file or stdin is dropped); with none, sampling starts from the "
        "start/end-of-text token. The first sample is streamed; "
        "tokens/s go to stderr.",
    )
    p.add_argument("source", metavar="SOURCE", help="run directory, model folder, or base model name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per sample (128)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample at this text (cut before it); repeatable")
    p.add_argument("--num-samples", type=int, default=1, help="completions to sample, as one batch (1)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16: the dtype of the weights while "
                   "decoding (auto: bf16 where the CPU or GPU runs it natively, else fp32)")
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR", help="apply a LoRA adapter folder")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile first (10-40 s on a small CPU; then about 2x "
                   "the tokens/s of quantized models: docs/compression.md)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT",
                   help="also write prompt, settings, samples and timings to this JSON file")
    p.set_defaults(func=run)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {exc}") from exc
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        return ""
    # Editors and `echo` end the text with one newline the user did not mean as part of the prompt.
    return text[:-1] if text.endswith("\n") else text


def run(args: argparse.Namespace) -> None:
    from pocketlm.generate import generate_from_source

    n = args.num_samples
    out = sys.stdout
    started = [False]

    def header() -> None:  # after the model loaded, before the first text
        if n > 1 and not started[0]:
            out.write(f"===== sample 1/{n} =====\n")
        started[0] = True

    def stream(index: int, piece: str) -> None:
        if index == 0:
            header()
            out.write(piece)
            out.flush()

    result = generate_from_source(
        args.source, lambda: _read_prompt(args), adapter=args.adapter, device=args.device,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, num_samples=n, seed=args.seed,
        precision=args.precision, compile=args.compile, on_text=stream, json_out=args.json,
    )
    header()
    out.write("\n")
    for i, text in enumerate(result["samples"][1:], start=2):
        out.write(f"===== sample {i}/{n} =====\n{text}\n")
    out.flush()
    print(f"pocketlm generate: {sum(result['new_tokens'])} tokens in {result['seconds']:.2f}s "
          f"({result['tokens_per_s']:.1f} tokens/s; prompt {result['prompt_tokens']} tokens, first token after "
          f"{result['first_token_seconds']:.2f}s) on {result['device']}", file=sys.stderr)
