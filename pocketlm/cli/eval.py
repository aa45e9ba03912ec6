"""`pocketlm eval MODEL_OR_RUN`: likelihood, multiple choice, generation scoring and form checks.

One run can do several evaluations; each adds its numbers at the top level of the --json report:
  --text FILE / --data DIR --split S   loss, perplexity, bits_per_byte (sliding windows)
  --multiple-choice FILE.jsonl         acc, acc_norm (HellaSwag format, lm-eval scoring)
  --prompts FILE.jsonl                 chrf (+ bleu), distinct-n; generations saved beside the JSON
  --form NAME --texts FILE             pass_rate and per-sample diagnostics; no model needed (`none`)
  --zero-shot PROBE FILE               accuracy of a generative model asked to classify (sentiment, paraphrase)
  --classify FILE                      accuracy, macro_f1, per-class numbers of a classifier run (alone)
  --forgetting (with --adapter) or --baseline MODEL: the probes before and after, and the difference.

The flags are the arguments of one library call, pocketlm.evaluate (pocketlm/eval/api.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model: perplexity, multiple choice, chrF, form checks",
        description=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="MODEL_OR_RUN",
                   help="run directory, model folder, base model name, or `none` for --form alone")
    p.add_argument("--adapter", type=Path, metavar="DIR", help="apply a LoRA adapter (folder or LoRA run)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the report here (generations beside it)")
    g = p.add_argument_group("likelihood")
    g.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 text file to score")
    g.add_argument("--data", type=Path, metavar="DIR", help="prepared data set (pocketlm prepare)")
    g.add_argument("--split", default="val", help="split of --data to score (val)")
    g.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens")
    g.add_argument("--context", type=int, metavar="N", help="window length (model context, at most 2048)")
    g.add_argument("--stride", type=int, metavar="N", help="window step: tokens scored per window (context/2)")
    g.add_argument("--batch-size", type=int, metavar="N", help="sequences per forward pass (auto)")
    g = p.add_argument_group("multiple choice")
    g.add_argument("--multiple-choice", type=Path, metavar="FILE", help="JSONL of {ctx, endings, label}")
    g.add_argument("--limit", type=int, metavar="N", help="only the first N items of --multiple-choice/--prompts")
    g = p.add_argument_group("generation")
    g.add_argument("--prompts", type=Path, metavar="FILE", help="JSONL of {prompt, reference}")
    g.add_argument("--sonnet-prompts", type=Path, nargs=2, metavar=("PROMPTS", "GOLD"),
                   help="build the prompts from CS224N's held-out sonnet files (e.g. sonnets_held_out_dev.txt "
                        "TRUE_sonnets_held_out_dev.txt)")
    g.add_argument("--write-prompts", type=Path, metavar="OUT", help="save the --sonnet-prompts JSONL here")
    g.add_argument("--bleu", action="store_true", help="also report BLEU")
    g.add_argument("--hypothesis", default="auto", choices=["auto", "completion", "prompt+completion"],
                   help="text scored against the reference (auto: with the prompt when the reference starts "
                        "with it)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (128)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end a generation at this text")
    g.add_argument("--seed", type=int, default=1337, help="sampling seed (1337), for reproducible scores")
    g = p.add_argument_group("forms")
    g.add_argument("--form", metavar="NAME", help="sonnet, screenplay or greentext")
    g.add_argument("--texts", type=Path, action="append", metavar="FILE",
                   help="texts to validate: JSONL with `text`, JSON, plain text (samples split by blank lines; "
                        "numbered sonnets), or a folder; repeatable")
    g = p.add_argument_group("classification")
    g.add_argument("--classify", type=Path, metavar="FILE",
                   help="labelled CSV/TSV/JSONL scored by a classifier run (finetune --task classify); "
                        "predictions are written beside --json")
    g.add_argument("--zero-shot", nargs=2, metavar=("PROBE", "FILE"),
                   help="sentiment, paraphrase or custom, and a labelled file: each label's word scored by "
                        "likelihood after a prompt")
    g.add_argument("--text-column", help="column of the text (default: the probe's or the classifier's)")
    g.add_argument("--text-pair-column", help="column of the second text of a pair")
    g.add_argument("--label-column", help="column of the label")
    g.add_argument("--template", help="zero-shot prompt with {text} (and {text_pair}), e.g. 'Review:{text}\\nSentiment:'")
    g.add_argument("--verbalizers", help="zero-shot words, one per class in label order, e.g. negative,positive")
    g.add_argument("--holdout", choices=["train", "val", "test"],
                   help="score only this part of the file's seeded split (as finetune --task classify splits a "
                        "file with no --val-data: 10%% val, 10%% test)")
    g.add_argument("--holdout-seed", type=int, default=1337, help="seed of that split (finetune's --seed)")
    g = p.add_argument_group("forgetting")
    g.add_argument("--forgetting", action="store_true",
                   help="run the likelihood/multiple-choice probes before and after applying --adapter")
    g.add_argument("--baseline", metavar="MODEL", help="compare the probes with this (base) model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto)")
    p.add_argument("--precision", default="auto", help="fp32, bf16, fp16 or auto (bf16 on CUDA, else fp32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm.eval.api import evaluate
    from pocketlm.eval.report import format_table

    report = evaluate(
        args.source, adapter=args.adapter, json_out=args.json, text=args.text, data=args.data, split=args.split,
        max_tokens=args.max_tokens, context=args.context, stride=args.stride, batch_size=args.batch_size,
        multiple_choice=args.multiple_choice, limit=args.limit, prompts=args.prompts,
        sonnet_prompts=args.sonnet_prompts, write_prompts=args.write_prompts, bleu=args.bleu,
        hypothesis=args.hypothesis, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
        seed=args.seed, form=args.form, texts=args.texts or (), classify=args.classify, zero_shot=args.zero_shot,
        text_column=args.text_column, text_pair_column=args.text_pair_column, label_column=args.label_column,
        template=args.template, verbalizers=args.verbalizers, holdout=args.holdout, holdout_seed=args.holdout_seed,
        forgetting=args.forgetting, baseline=args.baseline, device=args.device, precision=args.precision,
    )
    print(format_table(report))
