"""Fine-tuning a pretrained base: load it, check the data's tokenizer, build the model for the method
(full, lora, qlora), optionally search the learning rate with short runs, then run the one Trainer.

Every base source works: a built-in base (smollm2-135m), a model folder, a run directory, a .gguf file
(dequantized to fp32, so it trains like any model) or a Hub id in the Hugging Face cache. LoRA/QLoRA
settings are the recipe's `adapter:` (TrainConfig.adapter), so RUN/config.yaml records them.
"""

from __future__ import annotations

import copy
import math
import shutil
import sys
from dataclasses import replace

import torch

import pocketlm
from pocketlm.data.manifest import load_manifest
from pocketlm.errors import UserError
from pocketlm.io import load_model
from pocketlm.model import GPT
from pocketlm.names import METHODS
from pocketlm.recipe import AdapterConfig, TrainConfig
from pocketlm.rundir import RunDir
from pocketlm.tokenizer import Tokenizer, check_same_tokenizer, load_tokenizer

AdapterOptions = AdapterConfig  # the name before adapter settings joined the recipe


def load_base(source: str) -> tuple[GPT, Tokenizer]:
    """The base with fp32 weights on the CPU, every parameter trainable (train() moves it to the device)."""
    model, tokenizer = load_model(source, device="cpu", dtype=torch.float32)
    if any("lora_" in name for name, _ in model.named_parameters()):
        from pocketlm import lora  # a LoRA run as the base: fold its adapter in first

        model = lora.merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model, tokenizer


def check_data_tokenizer(data: str, tokenizer: Tokenizer, base: str) -> dict:
    """The data set's manifest, after checking it was tokenized with the base's tokenizer."""
    manifest = load_manifest(data)
    check_same_tokenizer(manifest["tokenizer"]["identity"], tokenizer.identity, f"data set {data}",
                         f"base {base}")
    return manifest


def build_for_method(model: GPT, method: str, adapter: AdapterConfig, base: str):
    """(saver, info) for the method; LoRA/QLoRA wrap the model in place (pocketlm.lora)."""
    from pocketlm.train import FullModelSaver

    if method not in METHODS:
        raise UserError(f"unknown fine-tuning method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "full":
        return FullModelSaver(), {"method": "full", "trainable_params": model.num_parameters(trainable_only=True)}
    from pocketlm import lora
    from pocketlm.io.peft import LoraSaver

    info = lora.prepare_model(model, method, adapter.rank, adapter.alpha, adapter.dropout, adapter.targets,
                              base=base)
    return LoraSaver(base), info


def parse_lr_list(text: str | list | None) -> list[float]:
    if text is None or text == "":
        return []
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        values = [float(x) for x in items if str(x).strip()]
    except ValueError as exc:
        raise UserError(f"--lr-search must be comma-separated numbers, e.g. 1e-4,3e-4,1e-3 (got {text!r})") from exc
    if not values or any(v <= 0 or not math.isfinite(v) for v in values):
        raise UserError(f"--lr-search needs positive learning rates, e.g. 1e-4,3e-4,1e-3 (got {text!r})")
    return values


def search_lr(base_model: GPT, tokenizer: Tokenizer, cfg: TrainConfig, lrs: list[float], steps: int) -> dict:
    """Short runs from the same base, one per learning rate, each evaluated at its last step; the lowest
    validation loss wins. Runs live in RUN/lr_search/lr-X (metrics and summary kept, weights dropped) and
    the results in RUN/lr_search.json; an interrupted search resumes with the rates it has not tried."""
    from pocketlm.train import train

    if steps <= 0:
        raise UserError(f"--lr-search-steps must be positive, got {steps}")
    run = RunDir(cfg.out)
    warmup = min(cfg.warmup_steps, steps // 4)
    results = []
    for lr in lrs:
        short_run = run.lr_search_run(lr)
        summary = short_run.read_summary()  # finished before an interruption
        if summary is None:
            shutil.rmtree(short_run.path, ignore_errors=True)  # a half-finished short run starts over
            model = copy.deepcopy(base_model)  # deepcopy keeps tied weights tied
            saver, _ = build_for_method(model, cfg.method, cfg.adapter, cfg.model)
            short = replace(cfg, out=str(short_run.path), lr=lr, max_steps=steps, warmup_steps=warmup,
                            eval_every=steps, save_every=steps, keep_checkpoints=1, patience=0, resume=False,
                            sample_every=0, eval_prompts=None, eval_form=None, tensorboard=False,
                            wandb_project=None)
            print(f"lr search: {lr:g} for {steps} steps", file=sys.stderr)
            summary = train(model, tokenizer, short, saver=saver)
            del model
        short_run.drop_checkpoints()  # only the numbers are needed
        results.append({"lr": lr, "val_loss": summary.get("best_val_loss"),
                        "final_train_loss": summary.get("final_train_loss"), "steps": summary.get("steps")})
    finite = [r for r in results if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    if not finite:
        raise UserError(f"every learning rate in the search diverged ({', '.join(f'{lr:g}' for lr in lrs)}): "
                        "try smaller ones")
    best = min(finite, key=lambda r: r["val_loss"])
    record = {"lrs": lrs, "steps": steps, "warmup_steps": warmup, "results": results, "best_lr": best["lr"],
              "at_edge": grid_edge(best["lr"], lrs)}
    run.write_lr_search(record)
    print(f"lr search: best {best['lr']:g} (val loss {best['val_loss']:.4f})", file=sys.stderr)
    if record["at_edge"]:
        print(f"lr search: warning: {edge_advice(best['lr'], lrs, record['at_edge'])}", file=sys.stderr)
    return record


def grid_edge(best: float, lrs: list[float]) -> str | None:
    """"largest" or "smallest" when the best rate is at that end of a grid of several, else None."""
    if len(set(lrs)) < 2:
        return None
    if best == max(lrs):
        return "largest"
    if best == min(lrs):
        return "smallest"
    return None


def edge_advice(best: float, lrs: list[float], edge: str) -> str:
    """What to say when the search picked the edge of its grid: the optimum may lie beyond it."""
    ordered = sorted(set(lrs))
    step = ordered[-1] / ordered[-2] if edge == "largest" else ordered[1] / ordered[0]
    beyond = best * step if edge == "largest" else best / step
    grid = ",".join(f"{x:g}" for x in sorted({*ordered, beyond}))
    return (f"{best:g} is the {edge} rate tried, so a better one may lie beyond the grid: extend it, "
            f"e.g. --lr-search {grid}")


def finetune(cfg: TrainConfig, *, adapter: AdapterConfig | dict | None = None,
             lr_search: list[float] | None = None, lr_search_steps: int = 50, qat=None) -> dict:
    """Fine-tune cfg.model (the base) on cfg.data with cfg.method (full, lora, qlora); returns the summary.

    `adapter` (optional) replaces cfg.adapter; `lr_search` runs short runs at these rates first and
    trains at the best one (`lr_search_steps` steps each). `qat` (pocketlm.compress.qat.QATOptions)
    trains through fake quantization (quantization-aware training).
    """
    from pocketlm.train import train

    if adapter is not None:
        cfg = replace(cfg, adapter=AdapterConfig.from_value(adapter))
    if cfg.method not in METHODS:
        raise UserError(f"unknown fine-tuning method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    cfg.validate()
    if qat is not None:
        qat.validate(cfg.method, cfg.adapter.dropout)
    # The tokenizer check first: it is cheap, loading a base's weights is not.
    check_data_tokenizer(cfg.data, load_tokenizer(cfg.model), cfg.model)
    if cfg.teacher:
        from pocketlm.distill import check_teacher_for

        check_teacher_for(cfg, load_tokenizer(cfg.model))
    model, tokenizer = load_base(cfg.model)
    extra: dict = {"base": cfg.model}
    from pocketlm.compress.convert import dequantize_model, is_quantized

    if is_quantized(model) and cfg.method == "full":  # full fine-tuning trains float weights
        model = dequantize_model(model).requires_grad_(True)
        extra["base_dequantized"] = True

    if lr_search:
        record = RunDir(cfg.out).read_lr_search() if cfg.resume else None  # the search already picked the rate
        if record is None:
            record = search_lr(model, tokenizer, cfg, lr_search, lr_search_steps)
        cfg = replace(cfg, lr=record["best_lr"])
        extra["lr_search"] = {"best_lr": record["best_lr"], "results": record["results"],
                              "at_edge": record.get("at_edge")}

    torch.manual_seed(cfg.seed)  # the adapter's random init follows --seed (the same on every rank)
    saver, info = build_for_method(model, cfg.method, cfg.adapter, cfg.model)
    if cfg.method != "full":
        extra["adapter"] = {k: info[k] for k in ("rank", "alpha", "dropout", "targets", "trainable_params")
                            if k in info}
    if qat is None:
        return train(model, tokenizer, cfg, saver=saver, extra_summary=extra)
    from pocketlm.compress.qat import finish_qat, prepare_qat

    saver = prepare_qat(model, qat, saver, cfg.method)  # fake quantization in the forward pass
    extra["qat"] = qat.to_dict()
    try:
        return train(model, tokenizer, cfg, saver=saver, extra_summary=extra)
    finally:
        finish_qat(saver)


pocketlm._make_callable(__name__)  # pocketlm.finetune(cfg, ...) is finetune
