"""`pocketlm serve SOURCE`: an OpenAI-compatible server (completions, chat, streaming) on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model with OpenAI's API (/v1/completions, /v1/chat/completions)",
        description="Serve SOURCE with an OpenAI-compatible API. Requests that arrive together are decoded "
                    "together in one batch. Point the openai client at base_url=http://HOST:PORT/v1.",
    )
    p.add_argument("source", help="built-in base (smollm2-135m), model folder, run directory or .gguf file")
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA adapter folder to apply")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("POCKETLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $POCKETLM_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: SOURCE's name)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template file (or `chatml`) for models whose tokenizer has none")
    p.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens prefilled between two decode steps (default 128): larger starts long "
                        "prompts sooner, smaller keeps running streams smoother")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="chat completion length when a request gives no max_tokens (default 512)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000; * for any) call the API from a "
                        "browser (CORS); repeatable; default: none")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16: the dtype of the weights "
                   "(auto: bf16 where the CPU or GPU runs it natively, else fp32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm.serve import serve

    serve(args.source, adapter=args.adapter, host=args.host, port=args.port, api_key=args.api_key,
          model_name=args.model_name, chat_template=args.chat_template, max_batch=args.max_batch,
          prefill_chunk=args.prefill_chunk, default_chat_tokens=args.default_max_tokens, device=args.device,
          precision=args.precision, allow_origins=args.allow_origin)
