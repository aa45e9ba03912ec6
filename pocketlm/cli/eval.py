"""`pocketlm eval MODEL_OR_RUN`: likelihood, multiple choice, generation scoring and form checks.

One run can do several evaluations; each adds its numbers at the top level of the --json report:
  --text FILE / --data DIR --split S   loss, perplexity, bits_per_byte (sliding windows)
  --multiple-choice FILE.jsonl         acc, acc_norm (HellaSwag format, lm-eval scoring)
  --prompts FILE.jsonl                 chrf (+ bleu), distinct-n; generations saved beside the JSON
  --form NAME --texts FILE             pass_rate and per-sample diagnostics; no model needed (`none`)
  --zero-shot PROBE FILE               accuracy of a generative model asked to classify (sentiment, paraphrase)
  --classify FILE                      accuracy, macro_f1, per-class numbers of a classifier run (alone)
  --forgetting (with --adapter) or --baseline MODEL: the probes before and after, and the difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pocketlm.errors import UserError


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


def _exists(path: Path | None, flag: str, what: str, folder: bool = False) -> None:
    if path is None:
        return
    ok = path.is_dir() if folder else path.exists()
    if not ok:
        raise UserError(f"{flag} {path} does not exist: give {what}")


def _no_model(args: argparse.Namespace) -> bool:
    return args.source.lower() == "none"


def _check_args(args: argparse.Namespace) -> None:
    """Every input mistake, before a model is loaded."""
    from pocketlm.atomic import check_output_file
    from pocketlm.eval.forms import get_form

    if args.json is not None:
        check_output_file(args.json, "--json")
    if getattr(args, "write_prompts", None) is not None:
        check_output_file(args.write_prompts, "--write-prompts")

    probes = args.text is not None or args.data is not None or args.multiple_choice is not None \
        or args.zero_shot is not None
    if args.classify is not None:
        _check_classify_args(args, probes)
        return
    # `none --sonnet-prompts P G --write-prompts OUT` only builds the prompt file.
    generation = args.prompts is not None or (args.sonnet_prompts is not None and not _no_model(args))
    if not (probes or generation or args.form or args.texts or args.write_prompts):
        raise UserError("nothing to evaluate: give --text, --data, --multiple-choice, --zero-shot, --classify, "
                        "--prompts or --form --texts")
    if args.text is not None and args.data is not None:
        raise UserError("give either --text or --data, not both (run eval twice to score both)")
    if args.prompts is not None and args.sonnet_prompts is not None:
        raise UserError("give either --prompts or --sonnet-prompts, not both")
    if args.form is not None:
        get_form(args.form)
        if not args.texts and not generation:
            raise UserError("--form needs --texts FILE (the texts to validate), or --prompts to validate generations")
    if args.texts and args.form is None:
        raise UserError("--texts needs --form sonnet|screenplay|greentext: which form to check")
    if args.write_prompts is not None and args.sonnet_prompts is None:
        raise UserError("--write-prompts saves the pairs built by --sonnet-prompts PROMPTS GOLD: give that too")
    _exists(args.text, "--text", "a UTF-8 text file")
    _exists(args.data, "--data", "a prepared data folder (pocketlm prepare)", folder=True)
    _exists(args.multiple_choice, "--multiple-choice", "a JSONL file of {ctx, endings, label}")
    _exists(args.prompts, "--prompts", "a JSONL file of {prompt, reference}")
    if args.zero_shot is not None:
        from pocketlm.eval.zero_shot import get_probe

        get_probe(args.zero_shot[0], args.template, _verbalizers(args))
        _exists(Path(args.zero_shot[1]), "--zero-shot", "a labelled CSV/TSV/JSONL file")
    for t in args.texts or []:
        _exists(t, "--texts", "a file (or folder) of texts")
    for t in args.sonnet_prompts or []:
        _exists(t, "--sonnet-prompts", "the held-out sonnet prompt and gold files")
    _exists(args.adapter, "--adapter", "a LoRA adapter folder or LoRA run", folder=True)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"unknown --precision {args.precision!r}: choose auto, fp32, bf16 or fp16")
    if args.forgetting and args.baseline:
        raise UserError("give either --forgetting (base vs --adapter) or --baseline MODEL, not both")
    if args.forgetting and args.adapter is None:
        raise UserError("--forgetting compares the model before and after --adapter: give --adapter DIR")
    if (args.forgetting or args.baseline) and not probes:
        raise UserError("forgetting is measured on --text, --data, --multiple-choice or --zero-shot: give one")
    needs_model = probes or generation
    if _no_model(args) and needs_model:
        raise UserError("this evaluation needs a model, but MODEL_OR_RUN is `none`: give a run, model folder or "
                        "base name (only --form --texts works without one)")
    if _no_model(args) and (args.adapter is not None or args.baseline):
        raise UserError("--adapter and --baseline need a model: MODEL_OR_RUN is `none`")


def _verbalizers(args: argparse.Namespace) -> list[str] | None:
    return [w for w in args.verbalizers.split(",") if w.strip()] if args.verbalizers else None


def _check_classify_args(args: argparse.Namespace, probes: bool) -> None:
    if probes or args.prompts or args.sonnet_prompts or args.form or args.texts or args.forgetting \
            or args.baseline or args.adapter:
        raise UserError("--classify evaluates a classifier run alone: run eval again for the other evaluations")
    if _no_model(args):
        raise UserError("--classify needs a classifier: give the run directory of `finetune --task classify`")
    _exists(args.classify, "--classify", "a labelled CSV/TSV/JSONL file")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")


def _run_classify(args: argparse.Namespace) -> None:
    """`eval RUN --classify FILE`: accuracy, macro_f1, per-class numbers; predictions beside --json."""
    from pocketlm.classify.predict import evaluate_classifier
    from pocketlm.eval import report as rep

    predictions = args.json.with_name(args.json.stem + ".predictions.jsonl") if args.json else None
    r = evaluate_classifier(args.source, args.classify, text_column=args.text_column,
                            label_column=args.label_column, text_pair_column=args.text_pair_column,
                            batch_size=args.batch_size or 32, device=args.device,
                            precision=None if args.precision == "auto" else args.precision, limit=args.limit,
                            predictions=predictions, holdout=args.holdout, holdout_seed=args.holdout_seed)
    metrics = {k: r[k] for k in ("accuracy", "macro_f1", "examples", "skipped_rows", "truncated_rows")}
    out = rep.build_report(model=args.source, adapter=None, data=rep.data_hashes([args.classify]),
                           settings={"device": args.device, "precision": args.precision, "limit": args.limit,
                                     "max_length": r["max_length"], "holdout": r.get("holdout")},
                           metrics=metrics, sections={k: r[k] for k in ("per_class", "confusion_matrix", "labels",
                                                                        "skipped_reasons")},
                           extra={"predictions_file": r.get("predictions_file")})
    if args.json is not None:
        rep.write_report(args.json, out)
    print(rep.format_table(out))


def _zero_shot_rows(args: argparse.Namespace):
    """(rows, probe) for --zero-shot, read and checked before any model loads."""
    from pocketlm.classify.data import read_labelled, select_holdout
    from pocketlm.eval.zero_shot import get_probe

    probe = get_probe(args.zero_shot[0], args.template, _verbalizers(args))
    data = read_labelled(args.zero_shot[1], args.text_column or probe.text_column,
                         args.label_column or probe.label_column, args.text_pair_column or probe.text_pair_column)
    rows, note = select_holdout(data.rows, args.holdout, args.holdout_seed)
    if note:
        print(f"pocketlm eval: {note}", file=sys.stderr)
    if data.skipped_total:
        print(f"pocketlm eval: skipped {data.skipped_total} malformed rows of {args.zero_shot[1]} "
              f"({', '.join(f'{k}: {v}' for k, v in data.skipped.items())})", file=sys.stderr)
    return (rows[: args.limit] if args.limit else rows), probe


def _probe(model, tokenizer, args: argparse.Namespace, items, zero=None) -> tuple[dict, dict]:
    """Likelihood, multiple-choice and zero-shot numbers of one model: (flat metrics, sections with details)."""
    from pocketlm.eval.likelihood import evaluate_split, evaluate_text, read_text_file
    from pocketlm.eval.multiple_choice import evaluate_multiple_choice

    precision = None if args.precision == "auto" else args.precision
    common = dict(context=args.context, stride=args.stride, batch_size=args.batch_size, precision=precision,
                  max_tokens=args.max_tokens)
    metrics: dict = {}
    sections: dict = {}
    result = None
    if args.text is not None:
        result = evaluate_text(model, tokenizer, read_text_file(args.text), **common)
    elif args.data is not None:
        result = evaluate_split(model, tokenizer, args.data, args.split, **common)
    if result is not None:
        metrics.update(loss=result.loss, perplexity=result.perplexity, bits_per_byte=result.bits_per_byte,
                       tokens=result.tokens)
        sections["likelihood"] = result.to_dict()
    if items is not None:
        mc = evaluate_multiple_choice(model, tokenizer, items, batch_size=args.batch_size or 16,
                                      context=args.context, precision=precision)
        metrics.update(acc=mc["acc"], acc_norm=mc["acc_norm"], mc_items=mc["items"])
        sections["multiple_choice"] = {k: mc[k] for k in ("acc", "acc_norm", "items")}
        sections["details"] = mc["details"]
    if zero is not None:
        from pocketlm.eval.zero_shot import evaluate_zero_shot

        zs = evaluate_zero_shot(model, tokenizer, zero[0], zero[1], batch_size=args.batch_size or 16,
                                context=args.context, precision=precision)
        metrics.update({k: zs[k] for k in ("accuracy", "accuracy_calibrated", "majority_accuracy", "macro_f1")},
                       zero_shot_examples=zs["examples"])
        sections["zero_shot"] = {k: v for k, v in zs.items() if k != "details"}
        sections["zero_shot_details"] = zs["details"]
    return metrics, sections


def _baseline_distance(model, base, tokenizer, base_tok, args: argparse.Namespace) -> dict:
    """kl_divergence and top1_agreement against --baseline on --text / --data (pocketlm.eval.compare)."""
    import torch

    from pocketlm.eval.compare import compare_models, compare_on_text
    from pocketlm.eval.likelihood import load_split_tokens, read_text_file

    with torch.no_grad():
        if args.text is not None:
            result = compare_on_text(model, base, tokenizer, base_tok, read_text_file(args.text),
                                     context=args.context, max_tokens=args.max_tokens)
        elif args.data is not None:
            tokens, manifest = load_split_tokens(args.data, args.split, args.max_tokens)
            result = compare_models(model, base, tokens.tolist(), start=manifest.get("eot_id"), context=args.context)
        else:
            return {}
    return {"kl_divergence": result["kl_divergence"], "top1_agreement": result["top1_agreement"]}


def _load(source: str, device):
    from pocketlm.io import load_model

    print(f"pocketlm eval: loading {source}", file=sys.stderr)
    return load_model(source, device=device)


def _data_files(args: argparse.Namespace) -> list[Path]:
    files = [p for p in (args.text, args.multiple_choice, args.prompts) if p is not None]
    files += [Path(args.zero_shot[1])] if args.zero_shot else []
    files += list(args.texts or []) + list(args.sonnet_prompts or [])
    if args.data is not None:
        from pocketlm.data.prepare import load_manifest

        manifest = load_manifest(args.data)
        files.append(args.data / "manifest.json")
        if args.split in manifest["splits"]:
            files += [args.data / s["file"] for s in manifest["splits"][args.split]["shards"]]
    return files


def run(args: argparse.Namespace) -> None:  # long: becomes a library evaluate() in the next step
    from dataclasses import asdict

    from pocketlm.eval import report as rep
    from pocketlm.eval.forms import get_form, read_texts, validate_samples
    from pocketlm.generate import SamplingSettings

    _check_args(args)
    if args.classify is not None:
        return _run_classify(args)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                stop=list(args.stop), seed=args.seed)
    metrics: dict = {}
    sections: dict = {}
    extra: dict = {}
    form = get_form(args.form) if args.form else None

    # Everything that needs no model, first: a bad file fails fast.
    if form is not None and args.texts:
        texts = [t for path in args.texts for t in read_texts(path, form)]
        if not texts:
            raise UserError(f"no texts found in {', '.join(map(str, args.texts))}")
        checked = validate_samples(form, texts)
        metrics.update(pass_rate=checked["pass_rate"], passed=checked["passed"], total=checked["total"])
        sections["form"] = {k: checked[k] for k in ("form", "pass_rate", "passed", "total")}
        extra["samples"] = checked["samples"]
    rows = None
    if args.sonnet_prompts is not None:
        from pocketlm.eval.generation_eval import sonnet_prompt_pairs, write_jsonl

        rows = sonnet_prompt_pairs(*args.sonnet_prompts)
        if args.write_prompts is not None:
            write_jsonl(args.write_prompts, rows)
            print(f"pocketlm eval: wrote {len(rows)} prompt/reference pairs to {args.write_prompts}",
                  file=sys.stderr)
    elif args.prompts is not None:
        from pocketlm.eval.generation_eval import read_prompt_pairs

        rows = read_prompt_pairs(args.prompts)
    if _no_model(args):
        rows = None  # prompts were only written
    if rows is not None and args.limit is not None:
        rows = rows[: args.limit]
    items = None
    if args.multiple_choice is not None:
        from pocketlm.eval.multiple_choice import read_multiple_choice

        items = read_multiple_choice(args.multiple_choice, args.limit)
    zero = _zero_shot_rows(args) if args.zero_shot is not None else None

    device = None
    needs_model = args.text is not None or args.data is not None or items is not None or rows is not None \
        or zero is not None
    if needs_model:
        import torch

        from pocketlm.device import pick_device

        device = pick_device(args.device)
        model, tokenizer = _load(args.source, "cpu")
        before = base = None
        if args.baseline:
            base, base_tok = _load(args.baseline, "cpu")
            before, _ = _probe(base.to(device), base_tok, args, items, zero)
        elif args.forgetting:
            before, _ = _probe(model.to(device), tokenizer, args, items, zero)
        if args.adapter is not None:
            from pocketlm.io.peft import find_adapter_folder, load_adapter

            model.to("cpu")
            info = load_adapter(model, find_adapter_folder(args.adapter))
            extra["adapter_info"] = info
        model = model.to(device).eval()
        with torch.no_grad():
            probe_metrics, probe_sections = _probe(model, tokenizer, args, items, zero)
        metrics.update(probe_metrics)
        sections.update(probe_sections)
        if before is not None:
            from pocketlm.eval.forgetting import compare

            sections["forgetting"] = compare(before, probe_metrics)
        if base is not None:  # the distance from the baseline's predictions (a quantized model vs its source)
            metrics.update(_baseline_distance(model, base, tokenizer, base_tok, args))
            del base
        from pocketlm.eval.compare import model_size_bytes

        metrics["size_bytes"] = model_size_bytes(args.source)
        if rows is not None:
            from pocketlm.eval.generation_eval import evaluate_generation

            gen_metrics, generations = evaluate_generation(model, tokenizer, rows, settings, form=form,
                                                           bleu=args.bleu, mode=args.hypothesis)
            gen_metrics["num_generations"] = gen_metrics.pop("generations")
            metrics.update(gen_metrics)
            sections["generation"] = dict(gen_metrics)
            extra["generations"] = generations

    out = rep.build_report(
        model=None if _no_model(args) else args.source,
        adapter=str(args.adapter) if args.adapter else None,
        data=rep.data_hashes(_data_files(args)),
        settings={"sampling": asdict(settings), "context": args.context, "stride": args.stride,
                  "max_tokens": args.max_tokens, "split": args.split if args.data else None, "limit": args.limit,
                  "hypothesis": args.hypothesis, "form": args.form, "device": str(device) if device else None,
                  "precision": args.precision, "baseline": args.baseline,
                  "zero_shot": args.zero_shot[0] if args.zero_shot else None, "holdout": args.holdout,
                  "holdout_seed": args.holdout_seed if args.holdout else None},
        metrics=metrics, sections=sections, extra=extra,
    )
    if args.json is not None:
        if "generations" in extra:
            gen_path = args.json.with_name(args.json.stem + ".generations.jsonl")
            from pocketlm.eval.generation_eval import write_jsonl

            write_jsonl(gen_path, extra["generations"])
            out["generations_file"] = str(gen_path)
        rep.write_report(args.json, out)
    print(rep.format_table(out))
