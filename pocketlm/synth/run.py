"""`synthesize(options)`: draw samples from a teacher, filter them, append them to a JSONL file, report.

Sample i of a run has a prompt (from the prompt list, round-robin, or the template rendered with seed
(--seed, i)), a sample seed (--seed + i) and an id: a hash of prompt, sampling settings and sample seed. The
same command therefore names the same samples; a rerun skips the ids the file already holds and stops when
the file holds exactly the requested number. Samples are filtered and written one at a time in the order
they come back, so the file's order is the order the dedupe indexes saw them in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pocketlm.atomic import atomic_write_json
from pocketlm.errors import UserError
from pocketlm.synth.filters import FILTER_ORDER, FilterChain, FilterSettings, reason_filter
from pocketlm.synth.prompts import PromptSource, load_prompts
from pocketlm.synth.store import RecordStore
from pocketlm.synth.teachers import Completion, Sampling, Teacher, is_url, make_teacher


@dataclass
class SynthOptions:
    teacher: str  # an OpenAI-compatible base URL, or a model SOURCE loaded in process
    prompts: str  # a prompt file or a template file (pocketlm.synth.prompts)
    out: str  # the JSONL file records are appended to
    samples: int  # records the file ends up with (per prompt with per_prompt)
    per_prompt: bool = False
    sample_prefix: str = ""  # ends every prompt and begins every sample's text (e.g. ">be me\n>")
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    concurrency: int = 1
    filters: FilterSettings = field(default_factory=FilterSettings)
    teacher_model: str | None = None  # the model name sent to a server (default: its first)
    api_key: str | None = None
    retries: int = 5
    timeout: float = 600.0
    device: str = "auto"
    report: str | None = None  # default: OUT with .report.json in place of .jsonl
    progress: bool = True


@dataclass
class Job:
    index: int
    prompt: str
    variables: dict
    seed: int
    id: str


def sample_id(prompt: str, sampling: Sampling, seed: int) -> str:
    blob = json.dumps({"prompt": prompt, "sampling": sampling.to_dict(), "seed": seed}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def plan_jobs(source: PromptSource, total: int, sampling: Sampling, seed: int, prefix: str = "") -> list[Job]:
    jobs = []
    for i in range(total):
        prompt, variables = source.prompt(i, seed)
        prompt += prefix
        jobs.append(Job(i, prompt, variables, seed + i, sample_id(prompt, sampling, seed + i)))
    return jobs


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name[: -len(out.suffix)] + ".report.json" if out.suffix else out.name + ".report.json")


def _validate(opts: SynthOptions) -> tuple[PromptSource, FilterChain, int]:
    """Everything that can be checked before a model loads or a request goes out."""
    if opts.samples < 1:
        raise UserError(f"--samples must be at least 1, got {opts.samples}")
    if opts.concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {opts.concurrency}")
    if opts.retries < 0:
        raise UserError(f"--retries must be >= 0, got {opts.retries}")
    if not str(opts.out).endswith((".jsonl", ".ndjson")):
        raise UserError(f"--out {opts.out} should be a .jsonl file (one record per line)")
    chain = FilterChain(opts.filters, perplexity=None)  # unknown validator, bad regex, ... fail here
    if chain.form is not None and not opts.sampling.stop:
        opts.sampling.stop = list(chain.form.generation_stop)  # one sample per request, not a run-on
    opts.sampling.validate()
    source = load_prompts(opts.prompts)
    if opts.per_prompt and source.count is None:
        raise UserError("--per-prompt needs a list of prompts; a template renders a new prompt for every sample")
    total = opts.samples * (source.count if opts.per_prompt else 1)
    return source, chain, total


def _read_corpora(paths: list[str], form_name: str | None) -> dict[str, list[str]]:
    from pocketlm.eval.forms import Form, get_form, read_texts

    form = get_form(form_name) if form_name else Form()
    return {p: read_texts(p, form) for p in paths}


def _perplexity_scorer(opts: SynthOptions):
    s = opts.filters
    if s.perplexity_model is None:
        if s.perplexity_min is not None or s.perplexity_max is not None:
            raise UserError("--perplexity-min/--perplexity-max need --perplexity-model SOURCE to score samples")
        return None
    from pocketlm.eval.likelihood import evaluate_text
    from pocketlm.synth.models import load_for_inference

    model, tokenizer = load_for_inference(s.perplexity_model, opts.device)
    return lambda text: evaluate_text(model, tokenizer, text).perplexity


def synthesize(opts: SynthOptions) -> dict:
    """Run (or continue) a synth job; returns the report, also written as JSON beside the output."""
    source, chain, total = _validate(opts)
    jobs = plan_jobs(source, total, opts.sampling, opts.seed, opts.sample_prefix)
    if opts.filters.dedupe_against:
        chain.load_corpora(_read_corpora(opts.filters.dedupe_against, opts.filters.validate))
    chain.perplexity = _perplexity_scorer(opts)
    teacher = make_teacher(opts.teacher, model=opts.teacher_model, api_key=opts.api_key, retries=opts.retries,
                           device=opts.device, timeout=opts.timeout)
    started = time.perf_counter()
    with RecordStore(opts.out) as store:
        wanted = {job.id for job in jobs}
        foreign = [r["id"] for r in store.records if r["id"] not in wanted]
        if foreign:
            raise UserError(f"{opts.out} holds {len(foreign)} records from other settings (prompts, sampling, "
                            "--seed or --samples): rerun with those settings, or choose another --out")
        for record in store.records:  # the dedupe state the earlier runs left
            if record.get("kept"):
                chain.keep(record["id"], record["text"])
        pending = [job for job in jobs if job.id not in store.ids]
        run = Counter(kept_before=sum(1 for r in store.records if r.get("kept")))
        try:
            if pending:
                asyncio.run(_generate(teacher, pending, opts, chain, store, run))
        finally:  # a failed or interrupted run still reports what the file holds
            report = _report(opts, store.records, total, run, time.perf_counter() - started, teacher)
            atomic_write_json(opts.report or report_path(opts.out), report)
    return report


async def _generate(teacher: Teacher, pending: list[Job], opts: SynthOptions, chain: FilterChain,
                    store: RecordStore, run: Counter) -> None:
    concurrency = opts.concurrency
    if teacher.max_concurrency is not None and concurrency > teacher.max_concurrency:
        print(f"synth: a local teacher answers one request at a time (--concurrency {concurrency} -> "
              f"{teacher.max_concurrency}); serve it (`pocketlm serve`) for batched requests", file=sys.stderr)
        concurrency = teacher.max_concurrency
    await teacher.start()
    queue = deque(pending)
    bar = tqdm(total=len(store.records) + len(pending), initial=len(store.records), desc="synth", unit="sample",
               disable=not opts.progress, file=sys.stderr, dynamic_ncols=True)
    run["started"] = time.perf_counter()

    def write(job: Job, completion: Completion) -> None:
        text = opts.sample_prefix + completion.text
        reason = chain.check(text)
        record = {"id": job.id, "index": job.index, "text": text, "kept": reason is None,
                  "reasons": [] if reason is None else [reason], "prompt": job.prompt,
                  **({"variables": job.variables} if job.variables else {}), "teacher": teacher.name,
                  "teacher_model": getattr(teacher, "model", None) if is_url(opts.teacher) else None,
                  "sampling": opts.sampling.to_dict(), "seed": job.seed,
                  "prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                  "finish_reason": completion.finish_reason}
        store.append(record)  # fsynced before the sample counts as done
        if reason is None:
            chain.keep(job.id, text)
        run["generated"] += 1
        run["kept"] += reason is None
        run["prompt_tokens"] += completion.prompt_tokens or 0
        run["completion_tokens"] += completion.completion_tokens or 0
        bar.update(1)
        bar.set_postfix(kept=run["kept_before"] + run["kept"], refresh=False)

    async def worker() -> None:
        while queue:
            job = queue.popleft()
            write(job, await teacher.complete(job.prompt, opts.sampling, job.seed))

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(pending)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        run["seconds_generating"] = time.perf_counter() - run["started"]
        bar.close()
        await teacher.close()


def _report(opts: SynthOptions, records: list[dict], total: int, run: Counter, seconds: float,
            teacher: Teacher) -> dict:
    kept = sum(1 for r in records if r.get("kept"))
    dropped = Counter(reason_filter(r["reasons"][0]) for r in records if not r.get("kept") and r.get("reasons"))
    gen_s = run.get("seconds_generating", 0.0)
    tokens = sum(r.get("completion_tokens") or 0 for r in records)
    return {
        "out": str(opts.out), "teacher": opts.teacher, "teacher_model": getattr(teacher, "model", None)
        if is_url(opts.teacher) else None, "prompts": str(opts.prompts),
        "requested": total, "records": len(records), "kept": kept, "kept_fraction": kept / len(records)
        if records else None,
        "dropped": {name: dropped[name] for name in FILTER_ORDER if dropped[name]},
        "completion_tokens": tokens,
        "this_run": {
            "generated": run["generated"], "kept": run["kept"], "prompt_tokens": run["prompt_tokens"],
            "completion_tokens": run["completion_tokens"], "seconds": round(seconds, 3),
            "seconds_generating": round(gen_s, 3),
            "samples_per_s": round(run["generated"] / gen_s, 3) if gen_s > 0 else None,
            "tokens_per_s": round(run["completion_tokens"] / gen_s, 1) if gen_s > 0 else None,
        },
        "concurrency": opts.concurrency, "seed": opts.seed, "sample_prefix": opts.sample_prefix,
        "sampling": opts.sampling.to_dict(),
        "filters": opts.filters.describe(),
    }


def format_report(report: dict) -> str:
    """The report as a few lines for a terminal."""
    run = report["this_run"]
    lines = [f"synth: {report['records']}/{report['requested']} records in {report['out']}, "
             f"{report['kept']} kept"
             + (f" ({report['kept_fraction']:.0%})" if report["kept_fraction"] is not None else "")]
    if report["dropped"]:
        lines.append("dropped: " + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()))
    lines.append(f"this run: {run['generated']} generated, {run['kept']} kept, {run['completion_tokens']} tokens in "
                 f"{run['seconds']:.1f} s" + (f" ({run['samples_per_s']:.2f} samples/s, {run['tokens_per_s']:.1f} "
                                               "tokens/s)" if run["samples_per_s"] else ""))
    return "\n".join(lines)
