"""`pocketlm.evaluate(SOURCE, ...)`: the library call behind `pocketlm eval`, with the command's options as
keyword arguments (a notebook runs what the shell runs).

One call can do several evaluations; each adds its numbers at the top level of the returned report:
  text=FILE / data=DIR, split=S        loss, perplexity, bits_per_byte (sliding windows)
  multiple_choice=FILE.jsonl           acc, acc_norm (HellaSwag format, lm-eval scoring)
  prompts=FILE.jsonl                   chrf (+ bleu), distinct-n; generations saved beside json_out
  form=NAME, texts=[FILE]              pass_rate and per-sample diagnostics; no model needed (source "none")
  zero_shot=(PROBE, FILE)              accuracy of a generative model asked to classify
  classify=FILE                        accuracy, macro_f1, per-class numbers of a classifier run (alone)
  forgetting=True (with adapter) or baseline=MODEL: the probes before and after, and the difference;
  with baseline, also kl_divergence and top1_agreement on text/data.

Every input mistake is a UserError raised before a model loads. Messages name the command's flags
(`--text`), which are these arguments' names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.names import PRECISIONS


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class EvalRequest:
    """The options of one evaluation (the arguments of `evaluate`), paths as Paths."""

    source: str = "none"
    adapter: Path | None = None
    json_out: Path | None = None
    text: Path | None = None
    data: Path | None = None
    split: str = "val"
    max_tokens: int | None = None
    context: int | None = None
    stride: int | None = None
    batch_size: int | None = None
    multiple_choice: Path | None = None
    limit: int | None = None
    prompts: Path | None = None
    sonnet_prompts: tuple[Path, Path] | None = None
    write_prompts: Path | None = None
    bleu: bool = False
    hypothesis: str = "auto"
    sampling: dict = field(default_factory=dict)  # SamplingSettings' fields, checked after the other inputs
    form: str | None = None
    texts: list[Path] = field(default_factory=list)
    classify: Path | None = None
    zero_shot: tuple[str, Path] | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    template: str | None = None
    verbalizers: list[str] | None = None
    holdout: str | None = None
    holdout_seed: int = 1337
    forgetting: bool = False
    baseline: str | None = None
    device: str = "auto"
    precision: str = "auto"

    @property
    def no_model(self) -> bool:
        return self.source.lower() == "none"

    @property
    def probes(self) -> bool:
        """Likelihood, multiple-choice or zero-shot: the evaluations forgetting and --baseline compare."""
        return self.text is not None or self.data is not None or self.multiple_choice is not None \
            or self.zero_shot is not None

    @property
    def generation(self) -> bool:
        # `none --sonnet-prompts P G --write-prompts OUT` only builds the prompt file.
        return self.prompts is not None or (self.sonnet_prompts is not None and not self.no_model)

    @property
    def torch_precision(self) -> str | None:
        return None if self.precision == "auto" else self.precision


def _path(value) -> Path | None:
    return None if value is None else Path(value).expanduser()


def make_request(source: str | Path | None, **options) -> EvalRequest:
    """An EvalRequest from `evaluate`'s arguments: paths become Paths, a comma list of verbalizers a list."""
    for name in ("adapter", "json_out", "text", "data", "multiple_choice", "prompts", "write_prompts", "classify"):
        options[name] = _path(options.get(name))
    options["texts"] = [Path(t).expanduser() for t in options.get("texts") or []]
    if options.get("sonnet_prompts") is not None:
        options["sonnet_prompts"] = tuple(Path(p).expanduser() for p in options["sonnet_prompts"])
    if options.get("zero_shot") is not None:
        probe, file = options["zero_shot"]
        options["zero_shot"] = (str(probe), Path(file).expanduser())
    words = options.get("verbalizers")
    if isinstance(words, str):
        options["verbalizers"] = [w for w in words.split(",") if w.strip()]
    return EvalRequest(source="none" if source is None else str(source), **options)


# -- checks: every input mistake, before a model is loaded ----------------------------------------------
def _exists(path: Path | None, flag: str, what: str, folder: bool = False) -> None:
    if path is None:
        return
    ok = path.is_dir() if folder else path.exists()
    if not ok:
        raise UserError(f"{flag} {path} does not exist: give {what}")


def _check_what(req: EvalRequest) -> None:
    """Which evaluations were asked for, and whether they go together."""
    from pocketlm.eval.forms import get_form

    if not (req.probes or req.generation or req.form or req.texts or req.write_prompts):
        raise UserError("nothing to evaluate: give --text, --data, --multiple-choice, --zero-shot, --classify, "
                        "--prompts or --form --texts")
    if req.text is not None and req.data is not None:
        raise UserError("give either --text or --data, not both (run eval twice to score both)")
    if req.prompts is not None and req.sonnet_prompts is not None:
        raise UserError("give either --prompts or --sonnet-prompts, not both")
    if req.form is not None:
        get_form(req.form)
        if not req.texts and not req.generation:
            raise UserError("--form needs --texts FILE (the texts to validate), or --prompts to validate generations")
    if req.texts and req.form is None:
        raise UserError("--texts needs --form sonnet|screenplay|greentext: which form to check")
    if req.write_prompts is not None and req.sonnet_prompts is None:
        raise UserError("--write-prompts saves the pairs built by --sonnet-prompts PROMPTS GOLD: give that too")


def _check_files(req: EvalRequest) -> None:
    _exists(req.text, "--text", "a UTF-8 text file")
    _exists(req.data, "--data", "a prepared data folder (pocketlm prepare)", folder=True)
    _exists(req.multiple_choice, "--multiple-choice", "a JSONL file of {ctx, endings, label}")
    _exists(req.prompts, "--prompts", "a JSONL file of {prompt, reference}")
    if req.zero_shot is not None:
        from pocketlm.eval.zero_shot import get_probe

        get_probe(req.zero_shot[0], req.template, req.verbalizers)
        _exists(req.zero_shot[1], "--zero-shot", "a labelled CSV/TSV/JSONL file")
    for t in req.texts:
        _exists(t, "--texts", "a file (or folder) of texts")
    for t in req.sonnet_prompts or []:
        _exists(t, "--sonnet-prompts", "the held-out sonnet prompt and gold files")
    _exists(req.adapter, "--adapter", "a LoRA adapter folder or LoRA run", folder=True)


def _check_numbers_and_models(req: EvalRequest) -> None:
    if req.limit is not None and req.limit < 1:
        raise UserError(f"--limit must be at least 1, got {req.limit}")
    if req.max_tokens is not None and req.max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {req.max_tokens}")
    if req.batch_size is not None and req.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {req.batch_size}")
    if req.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {req.precision!r}: choose auto, fp32, bf16 or fp16")
    if req.forgetting and req.baseline:
        raise UserError("give either --forgetting (base vs --adapter) or --baseline MODEL, not both")
    if req.forgetting and req.adapter is None:
        raise UserError("--forgetting compares the model before and after --adapter: give --adapter DIR")
    if (req.forgetting or req.baseline) and not req.probes:
        raise UserError("forgetting is measured on --text, --data, --multiple-choice or --zero-shot: give one")
    if req.no_model and (req.probes or req.generation):
        raise UserError("this evaluation needs a model, but MODEL_OR_RUN is `none`: give a run, model folder or "
                        "base name (only --form --texts works without one)")
    if req.no_model and (req.adapter is not None or req.baseline):
        raise UserError("--adapter and --baseline need a model: MODEL_OR_RUN is `none`")


def _check_classify(req: EvalRequest) -> None:
    if req.probes or req.prompts or req.sonnet_prompts or req.form or req.texts or req.forgetting \
            or req.baseline or req.adapter:
        raise UserError("--classify evaluates a classifier run alone: run eval again for the other evaluations")
    if req.no_model:
        raise UserError("--classify needs a classifier: give the run directory of `finetune --task classify`")
    _exists(req.classify, "--classify", "a labelled CSV/TSV/JSONL file")
    if req.batch_size is not None and req.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {req.batch_size}")


def check_request(req: EvalRequest) -> None:
    """Every input mistake, before a model is loaded."""
    from pocketlm.atomic import check_output_file

    if req.json_out is not None:
        check_output_file(req.json_out, "--json")
    if req.write_prompts is not None:
        check_output_file(req.write_prompts, "--write-prompts")
    if req.classify is not None:
        return _check_classify(req)
    _check_what(req)
    _check_files(req)
    _check_numbers_and_models(req)


# -- the evaluations ------------------------------------------------------------------------------------
def _classify_report(req: EvalRequest) -> dict:
    """`eval RUN --classify FILE`: accuracy, macro_f1, per-class numbers; predictions beside json_out."""
    from pocketlm.classify.predict import evaluate_classifier
    from pocketlm.eval import report as rep

    out = req.json_out
    predictions = out.with_name(out.stem + ".predictions.jsonl") if out else None
    r = evaluate_classifier(req.source, req.classify, text_column=req.text_column, label_column=req.label_column,
                            text_pair_column=req.text_pair_column, batch_size=req.batch_size or 32,
                            device=req.device, precision=req.torch_precision, limit=req.limit,
                            predictions=predictions, holdout=req.holdout, holdout_seed=req.holdout_seed)
    metrics = {k: r[k] for k in ("accuracy", "macro_f1", "examples", "skipped_rows", "truncated_rows")}
    return rep.build_report(model=req.source, adapter=None, data=rep.data_hashes([req.classify]),
                            settings={"device": req.device, "precision": req.precision, "limit": req.limit,
                                      "max_length": r["max_length"], "holdout": r.get("holdout"),
                                      "both_pair_orders": r["both_pair_orders"]},
                            metrics=metrics, sections={k: r[k] for k in ("per_class", "confusion_matrix", "labels",
                                                                         "skipped_reasons")},
                            extra={"predictions_file": r.get("predictions_file")})


def _zero_shot_rows(req: EvalRequest, log: Callable[[str], None]):
    """(rows, probe) for zero_shot, read and checked before any model loads."""
    from pocketlm.classify.data import read_labelled, select_holdout
    from pocketlm.eval.zero_shot import get_probe

    assert req.zero_shot is not None
    probe = get_probe(req.zero_shot[0], req.template, req.verbalizers)
    data = read_labelled(req.zero_shot[1], req.text_column or probe.text_column,
                         req.label_column or probe.label_column, req.text_pair_column or probe.text_pair_column)
    rows, note = select_holdout(data.rows, req.holdout, req.holdout_seed)
    if note:
        log(f"pocketlm eval: {note}")
    if data.skipped_total:
        log(f"pocketlm eval: skipped {data.skipped_total} malformed rows of {req.zero_shot[1]} "
            f"({', '.join(f'{k}: {v}' for k, v in data.skipped.items())})")
    return (rows[: req.limit] if req.limit else rows), probe


@dataclass
class _Inputs:
    """What the evaluations read, all before a model loads (a bad file fails fast)."""

    rows: list[dict] | None = None  # prompt/reference pairs to generate for
    items: list | None = None  # multiple-choice items
    zero: tuple | None = None  # (rows, probe) for zero-shot

    @property
    def need_model(self) -> bool:
        return self.rows is not None or self.items is not None or self.zero is not None


def _form_results(req: EvalRequest, form, out: dict) -> None:
    from pocketlm.eval.forms import read_texts, validate_samples

    texts = [t for path in req.texts for t in read_texts(path, form)]
    if not texts:
        raise UserError(f"no texts found in {', '.join(map(str, req.texts))}")
    checked = validate_samples(form, texts)
    out["metrics"].update(pass_rate=checked["pass_rate"], passed=checked["passed"], total=checked["total"])
    out["sections"]["form"] = {k: checked[k] for k in ("form", "pass_rate", "passed", "total")}
    out["extra"]["samples"] = checked["samples"]


def _read_inputs(req: EvalRequest, log: Callable[[str], None]) -> _Inputs:
    inputs = _Inputs()
    if req.sonnet_prompts is not None:
        from pocketlm.eval.generation_eval import sonnet_prompt_pairs, write_jsonl

        inputs.rows = sonnet_prompt_pairs(*req.sonnet_prompts)
        if req.write_prompts is not None:
            write_jsonl(req.write_prompts, inputs.rows)
            log(f"pocketlm eval: wrote {len(inputs.rows)} prompt/reference pairs to {req.write_prompts}")
    elif req.prompts is not None:
        from pocketlm.eval.generation_eval import read_prompt_pairs

        inputs.rows = read_prompt_pairs(req.prompts)
    if req.no_model:
        inputs.rows = None  # prompts were only written
    if inputs.rows is not None and req.limit is not None:
        inputs.rows = inputs.rows[: req.limit]
    if req.multiple_choice is not None:
        from pocketlm.eval.multiple_choice import read_multiple_choice

        inputs.items = read_multiple_choice(req.multiple_choice, req.limit)
    if req.zero_shot is not None:
        inputs.zero = _zero_shot_rows(req, log)
    return inputs


def _probe(model, tokenizer, req: EvalRequest, inputs: _Inputs) -> tuple[dict, dict]:
    """Likelihood, multiple-choice and zero-shot numbers of one model: (flat metrics, sections with details)."""
    from pocketlm.eval.likelihood import evaluate_split, evaluate_text, read_text_file
    from pocketlm.eval.multiple_choice import evaluate_multiple_choice

    precision = req.torch_precision
    common = dict(context=req.context, stride=req.stride, batch_size=req.batch_size, precision=precision,
                  max_tokens=req.max_tokens)
    metrics: dict = {}
    sections: dict = {}
    result = None
    if req.text is not None:
        result = evaluate_text(model, tokenizer, read_text_file(req.text), **common)
    elif req.data is not None:
        result = evaluate_split(model, tokenizer, req.data, req.split, **common)
    if result is not None:
        metrics.update(loss=result.loss, perplexity=result.perplexity, bits_per_byte=result.bits_per_byte,
                       tokens=result.tokens)
        sections["likelihood"] = result.to_dict()
    if inputs.items is not None:
        mc = evaluate_multiple_choice(model, tokenizer, inputs.items, batch_size=req.batch_size or 16,
                                      context=req.context, precision=precision)
        metrics.update(acc=mc["acc"], acc_norm=mc["acc_norm"], mc_items=mc["items"])
        sections["multiple_choice"] = {k: mc[k] for k in ("acc", "acc_norm", "items")}
        sections["details"] = mc["details"]
    if inputs.zero is not None:
        from pocketlm.eval.zero_shot import evaluate_zero_shot

        zs = evaluate_zero_shot(model, tokenizer, inputs.zero[0], inputs.zero[1], batch_size=req.batch_size or 16,
                                context=req.context, precision=precision)
        metrics.update({k: zs[k] for k in ("accuracy", "accuracy_calibrated", "majority_accuracy", "macro_f1")},
                       zero_shot_examples=zs["examples"])
        sections["zero_shot"] = {k: v for k, v in zs.items() if k != "details"}
        sections["zero_shot_details"] = zs["details"]
    return metrics, sections


def _baseline_distance(model, base, tokenizer, base_tok, req: EvalRequest) -> dict:
    """kl_divergence and top1_agreement against the baseline on text / data (pocketlm.eval.compare)."""
    import torch

    from pocketlm.eval.compare import compare_models, compare_on_text
    from pocketlm.eval.likelihood import load_split_tokens, read_text_file

    with torch.no_grad():
        if req.text is not None:
            result = compare_on_text(model, base, tokenizer, base_tok, read_text_file(req.text),
                                     context=req.context, max_tokens=req.max_tokens)
        elif req.data is not None:
            tokens, manifest = load_split_tokens(req.data, req.split, req.max_tokens)
            result = compare_models(model, base, tokens.tolist(), start=manifest.get("eot_id"), context=req.context)
        else:
            return {}
    return {"kl_divergence": result["kl_divergence"], "top1_agreement": result["top1_agreement"]}


def _load(source: str, log: Callable[[str], None]):
    from pocketlm.io import load_model

    log(f"pocketlm eval: loading {source}")
    return load_model(source, device="cpu")


def _with_model(req: EvalRequest, inputs: _Inputs, settings, form, out: dict, log: Callable[[str], None]):
    """Every evaluation that needs the model (and the baseline or the model before its adapter); returns
    the device they ran on."""
    import torch

    from pocketlm.device import pick_device

    device = pick_device(req.device)
    model, tokenizer = _load(req.source, log)
    before = base = None
    if req.baseline:
        base, base_tok = _load(req.baseline, log)
        before, _ = _probe(base.to(device), base_tok, req, inputs)
    elif req.forgetting:
        before, _ = _probe(model.to(device), tokenizer, req, inputs)
    if req.adapter is not None:
        from pocketlm.io.peft import find_adapter_folder, load_adapter

        model.to("cpu")
        out["extra"]["adapter_info"] = load_adapter(model, find_adapter_folder(req.adapter))
    model = model.to(device).eval()
    with torch.no_grad():
        metrics, sections = _probe(model, tokenizer, req, inputs)
    out["metrics"].update(metrics)
    out["sections"].update(sections)
    if before is not None:
        from pocketlm.eval.forgetting import compare

        out["sections"]["forgetting"] = compare(before, metrics)
    if base is not None:  # the distance from the baseline's predictions (a quantized model vs its source)
        out["metrics"].update(_baseline_distance(model, base, tokenizer, base_tok, req))
        del base
    from pocketlm.eval.compare import model_size_bytes

    out["metrics"]["size_bytes"] = model_size_bytes(req.source)
    if inputs.rows is not None:
        from pocketlm.eval.generation_eval import evaluate_generation

        gen_metrics, generations = evaluate_generation(model, tokenizer, inputs.rows, settings, form=form,
                                                       bleu=req.bleu, mode=req.hypothesis)
        gen_metrics["num_generations"] = gen_metrics.pop("generations")
        out["metrics"].update(gen_metrics)
        out["sections"]["generation"] = dict(gen_metrics)
        out["extra"]["generations"] = generations
    return device


# -- the report -----------------------------------------------------------------------------------------
def _data_files(req: EvalRequest) -> list[Path]:
    files = [p for p in (req.text, req.multiple_choice, req.prompts) if p is not None]
    files += [req.zero_shot[1]] if req.zero_shot else []
    files += list(req.texts) + list(req.sonnet_prompts or [])
    if req.data is not None:
        from pocketlm.data.manifest import load_manifest

        manifest = load_manifest(req.data)
        files.append(req.data / "manifest.json")
        if req.split in manifest["splits"]:
            files += [req.data / s["file"] for s in manifest["splits"][req.split]["shards"]]
    return files


def _settings(req: EvalRequest, settings, device) -> dict:
    return {"sampling": asdict(settings), "context": req.context, "stride": req.stride,
            "max_tokens": req.max_tokens, "split": req.split if req.data else None, "limit": req.limit,
            "hypothesis": req.hypothesis, "form": req.form, "device": str(device) if device else None,
            "precision": req.precision, "baseline": req.baseline,
            "zero_shot": req.zero_shot[0] if req.zero_shot else None, "holdout": req.holdout,
            "holdout_seed": req.holdout_seed if req.holdout else None}


def _write(req: EvalRequest, report: dict) -> None:
    """The report to json_out, generations beside it (OUT.generations.jsonl)."""
    from pocketlm.eval import report as rep

    if req.json_out is None:
        return
    if "generations" in report:
        from pocketlm.eval.generation_eval import write_jsonl

        gen_path = req.json_out.with_name(req.json_out.stem + ".generations.jsonl")
        write_jsonl(gen_path, report["generations"])
        report["generations_file"] = str(gen_path)
    rep.write_report(req.json_out, report)


def run_request(req: EvalRequest, log: Callable[[str], None] = _stderr) -> dict:
    """Check, evaluate and report one EvalRequest (what `evaluate` does after building it)."""
    from pocketlm.eval import report as rep
    from pocketlm.eval.forms import get_form
    from pocketlm.generate import SamplingSettings

    check_request(req)
    if req.classify is not None:
        report = _classify_report(req)
        if req.json_out is not None:
            rep.write_report(req.json_out, report)
        return report
    settings = SamplingSettings(**req.sampling)
    out: dict = {"metrics": {}, "sections": {}, "extra": {}}
    form = get_form(req.form) if req.form else None
    if form is not None and req.texts:  # needs no model: first, so a bad file fails fast
        _form_results(req, form, out)
    inputs = _read_inputs(req, log)
    needs_model = req.text is not None or req.data is not None or inputs.need_model
    device = _with_model(req, inputs, settings, form, out, log) if needs_model else None
    report = rep.build_report(model=None if req.no_model else req.source,
                              adapter=str(req.adapter) if req.adapter else None,
                              data=rep.data_hashes(_data_files(req)), settings=_settings(req, settings, device),
                              metrics=out["metrics"], sections=out["sections"], extra=out["extra"])
    _write(req, report)
    return report


def evaluate(source: str | Path | None, *, text: str | Path | None = None, data: str | Path | None = None,
             split: str = "val", multiple_choice: str | Path | None = None, prompts: str | Path | None = None,
             form: str | None = None, texts: Sequence[str | Path] = (), zero_shot: tuple[str, str | Path] | None = None,
             classify: str | Path | None = None, adapter: str | Path | None = None, baseline: str | None = None,
             forgetting: bool = False, json_out: str | Path | None = None, max_tokens: int | None = None,
             context: int | None = None, stride: int | None = None, batch_size: int | None = None,
             limit: int | None = None, sonnet_prompts: tuple[str | Path, str | Path] | None = None,
             write_prompts: str | Path | None = None, bleu: bool = False, hypothesis: str = "auto",
             max_new_tokens: int = 128, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
             seed: int = 1337, text_column: str | None = None, text_pair_column: str | None = None,
             label_column: str | None = None, template: str | None = None,
             verbalizers: str | Sequence[str] | None = None, holdout: str | None = None, holdout_seed: int = 1337,
             device: str = "auto", precision: str = "auto", log: Callable[[str], None] = _stderr) -> dict:
    """Evaluate SOURCE (run directory, model folder, built-in base, .gguf, Hub id; "none" or None for
    form checks alone) as `pocketlm eval` does; returns the report (the --json file's content) and writes
    it to `json_out` when given. Arguments are the command's flags (`--zero-shot PROBE FILE` is
    `zero_shot=(PROBE, FILE)`; `--json` is `json_out`); `log` receives the progress lines.

        report = pocketlm.evaluate("runs/lora", text="heldout.txt", baseline="smollm2-135m")
        report["bits_per_byte"], report["kl_divergence"]
    """
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty, stop=list(stop), seed=seed)
    req = make_request(source, text=text, data=data, split=split, multiple_choice=multiple_choice, prompts=prompts,
                       form=form, texts=texts, zero_shot=zero_shot, classify=classify, adapter=adapter,
                       baseline=baseline, forgetting=forgetting, json_out=json_out, max_tokens=max_tokens,
                       context=context, stride=stride, batch_size=batch_size, limit=limit,
                       sonnet_prompts=sonnet_prompts, write_prompts=write_prompts, bleu=bleu, hypothesis=hypothesis,
                       sampling=sampling, text_column=text_column, text_pair_column=text_pair_column,
                       label_column=label_column, template=template, verbalizers=verbalizers, holdout=holdout,
                       holdout_seed=holdout_seed, device=device, precision=precision)
    return run_request(req, log)
