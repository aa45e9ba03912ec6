"""`pocketlm synth --teacher URL_OR_SOURCE --prompts FILE --samples N --out FILE.jsonl`: teacher-written data."""

from __future__ import annotations

import argparse
import json

from pocketlm.cli.common import HelpFormatter


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="generate training data with a teacher model, filtered and deduplicated",
        description="Sample texts from a teacher (an OpenAI-compatible server URL such as `pocketlm serve`, or a "
        "model SOURCE loaded in process), filter them (form validator, length, regex, dedupe, perplexity band) "
        "and append one record per sample to a JSONL file, fsynced line by line. Rerunning the same command "
        "continues where a killed run stopped and ends with exactly --samples records. The kept records are a "
        "corpus for `pocketlm prepare FILE.jsonl --text-field text`; a report goes to FILE.report.json.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--teacher", required=True, metavar="URL_OR_SOURCE",
                   help="http(s)://host:port[/v1] of an OpenAI-compatible server, or a model SOURCE")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompts (.txt one a line, .jsonl with `prompt`) or a template (.yaml, see README)")
    p.add_argument("--samples", type=int, required=True, metavar="N", help="records the output file ends with")
    p.add_argument("--per-prompt", action="store_true", help="N samples for every prompt of the list")
    p.add_argument("--sample-prefix", default="", metavar="TEXT",
                   help="text that ends every prompt and begins every sample (e.g. '>be me\\n>'; \\n is a newline)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="append records here (resumes)")
    p.add_argument("--report", default=None, metavar="FILE.json", help="report file (default: OUT.report.json)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample at this text; repeatable (default with --validate: the form's separator)")
    s.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    s.add_argument("--chat", action="store_true", help="send prompts as chat messages (chat/instruct models)")
    t = p.add_argument_group("teacher")
    t.add_argument("--concurrency", type=int, default=1, metavar="K", help="requests in flight at once (URL)")
    t.add_argument("--teacher-model", default=None, help="model name sent to the server (default: its first)")
    t.add_argument("--api-key", default=None, help="bearer key for the server (or POCKETLM_API_KEY / "
                   "OPENAI_API_KEY)")
    t.add_argument("--retries", type=int, default=5, help="retries on connection errors, 429 and 5xx (backoff)")
    t.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    t.add_argument("--device", default="auto", help="device of a local teacher and the perplexity model")
    f = p.add_argument_group("filters (applied in this order)")
    f.add_argument("--validate", default=None, metavar="FORM", help="form validator: sonnet, screenplay, greentext")
    f.add_argument("--min-chars", type=int, default=None)
    f.add_argument("--max-chars", type=int, default=None)
    f.add_argument("--regex", default=None, help="keep samples this regular expression matches (re.search)")
    f.add_argument("--exclude-regex", default=None, help="drop samples this regular expression matches")
    f.add_argument("--dedupe", default="none", choices=("none", "exact", "minhash"),
                   help="exact: same normalised text; minhash: also near duplicates (MinHash LSH)")
    f.add_argument("--dedupe-threshold", type=float, default=0.8, help="Jaccard similarity of a near duplicate")
    f.add_argument("--dedupe-against", action="append", default=[], metavar="CORPUS",
                   help="drop samples that copy a text of this corpus (e.g. the evaluation data); repeatable")
    f.add_argument("--perplexity-model", default=None, metavar="SOURCE", help="reference model for --perplexity-*")
    f.add_argument("--perplexity-min", type=float, default=None)
    f.add_argument("--perplexity-max", type=float, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pocketlm.synth import FilterSettings, Sampling, SynthOptions, format_report, synthesize

    opts = SynthOptions(
        teacher=args.teacher, prompts=args.prompts, out=args.out, samples=args.samples, per_prompt=args.per_prompt,
        sample_prefix=args.sample_prefix.replace("\\n", "\n"),
        sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          stop=list(args.stop), chat=args.chat),
        seed=args.seed, concurrency=args.concurrency,
        filters=FilterSettings(validate=args.validate, min_chars=args.min_chars, max_chars=args.max_chars,
                               regex=args.regex, exclude_regex=args.exclude_regex, dedupe=args.dedupe,
                               dedupe_threshold=args.dedupe_threshold, dedupe_against=list(args.dedupe_against),
                               perplexity_model=args.perplexity_model, perplexity_min=args.perplexity_min,
                               perplexity_max=args.perplexity_max),
        teacher_model=args.teacher_model, api_key=args.api_key, retries=args.retries, timeout=args.timeout,
        device=args.device, report=args.report, progress=not args.quiet,
    )
    report = synthesize(opts)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
