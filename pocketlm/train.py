"""The one training loop: pretraining and every fine-tuning method (full, LoRA, QLoRA) run through `train`.

Read top to bottom: set up (device, data, optimizer, resume), then one optimizer step per iteration
(gradient accumulation over micro-batches, clip, AdamW, cosine schedule), logging, evaluation,
early stopping and atomic checkpoints. Resuming restores weights, optimizer, RNG and data position, so
every loss after a resume equals the loss an uninterrupted run computes at that step.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml
from tqdm import tqdm

from pocketlm import checkpoint as ckpt
from pocketlm.data.batches import Batches, TokenSplit
from pocketlm.device import autocast, default_precision, peak_memory_bytes
from pocketlm.distributed import (
    Dist,
    accumulation_steps,
    all_reduce_mean,
    barrier,
    checkpoint_state,
    grad_sync,
    init_distributed,
    is_sharded,
    load_optimizer_state,
)
from pocketlm.errors import UserError
from pocketlm.memory import allocator_in_effect, release_free_memory
from pocketlm.model import GPT
from pocketlm.preflight import check_before_training
from pocketlm.recipe import TrainConfig, add_train_arguments, config_from_args, load_recipe
from pocketlm.tokenizer import Tokenizer, check_same_tokenizer

__all__ = ["TrainConfig", "train", "load_recipe", "add_train_arguments", "config_from_args",
           "WeightSaver", "FullModelSaver", "lr_at"]


class WeightSaver(Protocol):
    def save(self, model: GPT, tokenizer: Tokenizer, directory: Path) -> None: ...
    def load(self, model: GPT, directory: Path) -> None: ...


class FullModelSaver:
    """Checkpoints hold a whole model folder (Hugging Face layout)."""

    def save(self, model: GPT, tokenizer: Tokenizer, directory: Path) -> None:
        ckpt.write_model_files(model, tokenizer, directory)

    def load(self, model: GPT, directory: Path) -> None:
        ckpt.load_state_into(model, ckpt.read_hf_weights(directory), str(directory))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; matrices decay, biases and norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu") and all(p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """A run directory: config, metrics.jsonl, checkpoints with atomic latest/best pointers."""

    def __init__(self, out: str | Path, is_main: bool) -> None:
        self.dir = Path(out)
        self.is_main = is_main
        self.ckpts = self.dir / "checkpoints"
        self.metrics = self.dir / "metrics.jsonl"

    def log(self, row: dict) -> None:
        if self.is_main:
            with self.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, last_step: int) -> None:
        """Drop rows logged after the checkpoint we resume from: they will be logged again."""
        if self.is_main and self.metrics.exists():
            rows = [line for line in self.metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= last_step]
            ckpt.atomic_write_text(self.metrics, "".join(r + "\n" for r in rows))

    def append_sample(self, row: dict) -> None:
        if self.is_main:
            with (self.dir / "samples.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def save(self, step: int, model: GPT, tokenizer: Tokenizer, saver: WeightSaver, optimizer_state: dict,
             state: dict, is_best: bool, keep: int) -> None:
        if not self.is_main:
            return
        name = f"step-{step:07d}"
        with ckpt.AtomicDir(self.ckpts / name) as tmp:
            saver.save(model, tokenizer, tmp)
            torch.save({"optimizer": optimizer_state, "rng": _rng_state()}, tmp / "trainer_state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        ckpt.atomic_write_text(self.ckpts / "latest", name)
        if is_best:
            ckpt.atomic_write_text(self.ckpts / "best", name)
        self._prune(keep)

    def _prune(self, keep: int) -> None:
        protected = {(self.ckpts / p).read_text().strip() for p in ("latest", "best") if (self.ckpts / p).exists()}
        steps = sorted(p.name for p in self.ckpts.glob("step-*") if p.is_dir())
        for name in steps[: max(0, len(steps) - keep)]:
            if name not in protected:
                shutil.rmtree(self.ckpts / name, ignore_errors=True)


@torch.no_grad()
def evaluate_loss(model: GPT, batches: Batches, n_batches: int, micro_batch: int, device, precision) -> float:
    """Mean loss over the first n_batches * micro_batch validation windows (the same ones every time)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    windows = min(batches.n, n_batches * micro_batch)
    for start in range(0, windows, micro_batch):
        x, y = batches.get(start, min(micro_batch, windows - start))
        with autocast(device, precision):
            _, loss = model(x.to(device), y.to(device), return_logits=False)
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    model.train(was_training)
    return total / count


def _sample(model: GPT, tokenizer: Tokenizer, cfg: TrainConfig, step: int, run: Run) -> None:
    from pocketlm.generate import SamplingSettings, generate

    settings = SamplingSettings(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed)
    was_training = model.training
    model.eval()
    text = generate(model, tokenizer, cfg.sample_prompt, settings)[0]
    model.train(was_training)
    run.append_sample({"step": step, "prompt": cfg.sample_prompt, "text": text})


def train(model: GPT, tokenizer: Tokenizer, cfg: TrainConfig, *, saver: WeightSaver | None = None,
          extra_summary: dict | None = None) -> dict:
    cfg.validate()
    saver = saver or FullModelSaver()
    dist_info, device = init_distributed(cfg.device)
    precision = default_precision(device) if cfg.precision == "auto" else cfg.precision
    run = Run(cfg.out, dist_info.is_main)

    # Data, and the tokenizer check: a model must never train on another tokenizer's ids.
    train_split, val_split = TokenSplit(cfg.data, "train"), TokenSplit(cfg.data, "val")
    check_same_tokenizer(train_split.tokenizer_identity, tokenizer.identity, f"data set {cfg.data}",
                         f"model {cfg.model}")
    if cfg.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.dropout
    model_context = min(model.config.block_size, train_split.tokens - 1)
    check_before_training(cfg, model.config.block_size, train_split, val_split, dist_info.world_size)

    # Resume or start.
    latest = ckpt.checkpoint_dir(run.dir, "latest")
    if latest is not None and not cfg.resume:
        raise UserError(f"{run.dir} already holds a run: pass --resume to continue it, or choose another --out")
    if run.is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run.dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    model.to(device)
    store_frozen_linears(model, precision)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.train()
    state = {"step": 0, "data_position": {}, "tokens": 0, "best_val_loss": None, "best_step": None,
             "bad_evals": 0}
    trainer = None
    if cfg.resume and latest is not None:
        saver.load(model, latest)
        trainer = torch.load(latest / "trainer_state.pt", map_location="cpu", weights_only=True)
        _set_rng_state(trainer["rng"])
        state = json.loads((latest / "trainer_state.json").read_text())
        run.truncate_metrics(state["step"])
        if dist_info.is_main:
            print(f"resuming {run.dir} from step {state['step']}", file=sys.stderr)
    elif cfg.resume and dist_info.is_main:
        print(f"no checkpoint in {run.dir} yet: starting from step 0", file=sys.stderr)

    # The optimizer comes after wrapping: FSDP2 replaces the parameters with sharded ones.
    forward = _wrap_model(model, cfg, dist_info, device)
    optimizer = make_optimizer(model, cfg, device)
    if trainer is not None:
        load_optimizer_state(model, optimizer, trainer["optimizer"])
    start_step = state["step"]
    if device.type == "cpu":
        release_free_memory()  # setting up left freed copies behind: not part of training's footprint
    batch_cache: dict[int, Batches] = {}
    val_cache: dict[int, Batches] = {}
    world = dist_info.world_size
    stopped_early = False
    last_train_loss = float("nan")
    t_start = time.perf_counter()
    tokens_this_session = 0
    writer = _tensorboard(run) if dist_info.is_main else None
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=f"{cfg.method} {run.dir.name}",
               disable=not dist_info.is_main, file=sys.stderr, dynamic_ncols=True)

    for step in range(start_step, cfg.max_steps):
        context = cfg.context_at(step, model_context)
        per_step = cfg.batch_tokens // context  # windows in one global batch
        accum = accumulation_steps(cfg.batch_tokens, context, cfg.micro_batch, world)
        if context not in batch_cache:
            batch_cache[context] = Batches(train_split, context, cfg.seed)
        batches = batch_cache[context]
        position = state["data_position"].get(str(context), 0) + dist_info.rank * (per_step // world)

        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = batches.get(position + micro * cfg.micro_batch, cfg.micro_batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Under DDP, gradients are all-reduced only on the last micro-batch of the step.
            sync = grad_sync(forward, last_micro_batch=micro == accum - 1)
            with sync:
                with autocast(device, precision):
                    _, loss = forward(x, y, return_logits=False)
                (loss / accum).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = all_reduce_mean(loss_sum / accum, dist_info).item()
        elapsed = time.perf_counter() - t0
        last_train_loss = train_loss
        state["data_position"][str(context)] = state["data_position"].get(str(context), 0) + per_step
        state["tokens"] += per_step * context
        state["step"] = step + 1
        tokens_this_session += per_step * context
        done = step + 1

        row = None
        if done % cfg.log_every == 0 or done == cfg.max_steps or done % cfg.eval_every == 0:
            row = {"step": done, "tokens": state["tokens"], "train_loss": round(train_loss, 6), "lr": lr,
                   "tokens_per_s": round(per_step * context / elapsed, 1),
                   "memory_bytes": peak_memory_bytes(device), "context": context}
        evaluate = done % cfg.eval_every == 0 or done == cfg.max_steps
        is_best = False
        if evaluate:
            if context not in val_cache:
                val_cache[context] = Batches(val_split, min(context, val_split.tokens - 1), cfg.seed, shuffle=False)
            val_loss = evaluate_loss(model, val_cache[context], cfg.eval_batches, cfg.micro_batch, device,
                                     precision)
            row["val_loss"] = round(val_loss, 6)
            if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                state.update(best_val_loss=val_loss, best_step=done, bad_evals=0)
                is_best = True
            else:
                state["bad_evals"] += 1
            if cfg.eval_prompts and (dist_info.is_main or is_sharded(model)):  # FSDP2: all ranks run it
                from pocketlm.eval.during_training import evaluate_during_training

                row.update(evaluate_during_training(model, tokenizer, cfg))
            stopped_early = cfg.patience > 0 and state["bad_evals"] >= cfg.patience
        if cfg.sample_every and done % cfg.sample_every == 0 and (dist_info.is_main or is_sharded(model)):
            _sample(model, tokenizer, cfg, done, run)
        if row is not None:
            run.log(row)
            if writer is not None:
                for key, value in row.items():
                    if key != "step":
                        writer.add_scalar(key, value, done)
        save_every = cfg.save_every or cfg.eval_every
        if is_best or done % save_every == 0 or done == cfg.max_steps or stopped_early:
            full_model, optimizer_state = checkpoint_state(model, optimizer)  # every rank: FSDP2 gathers
            run.save(done, full_model, tokenizer, saver, optimizer_state, state, is_best, cfg.keep_checkpoints)
            barrier(dist_info)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{per_step * context / elapsed:,.0f}",
                        **({"val": f"{row['val_loss']:.3f}"} if row and "val_loss" in row else {}))
        if stopped_early:
            if dist_info.is_main:
                print(f"early stopping at step {done}: no improvement in {cfg.patience} evaluations",
                      file=sys.stderr)
            break
    bar.close()
    if writer is not None:
        writer.close()

    wall = time.perf_counter() - t_start
    summary = {
        "method": cfg.method, "model": cfg.model, "data": cfg.data, "steps": state["step"],
        "tokens": state["tokens"], "final_train_loss": last_train_loss,
        "best_val_loss": state["best_val_loss"], "best_step": state["best_step"],
        "stopped_early": stopped_early, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens_this_session / wall, 1) if wall > 0 else None,
        "peak_memory_bytes": peak_memory_bytes(device), "device": str(device), "precision": precision,
        "allocator": allocator_in_effect() if device.type == "cpu" else None,
        "parameters": model.num_parameters(), "trainable_parameters": model.num_parameters(trainable_only=True),
        "world_size": world, **(extra_summary or {}),
    }
    if run.is_main:
        ckpt.atomic_write_json(run.dir / "summary.json", summary)
    return summary


def store_frozen_linears(model: GPT, precision: str) -> None:
    """Under bf16/fp16 autocast, hold frozen linear weights of the blocks (a LoRA run's base) in that
    dtype. Autocast casts them to it on every use anyway, so the numbers are identical; holding them
    cast halves their memory and saves two casts per layer per step. Embeddings and norms stay fp32."""
    if precision not in ("bf16", "fp16"):
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for module in model.transformer.h.modules():
        if type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)


def _wrap_model(model: GPT, cfg: TrainConfig, d: Dist, device: torch.device):
    """DDP (or FSDP2) under torchrun, torch.compile if asked; the plain model otherwise."""
    forward = model
    if d.enabled:
        from pocketlm.distributed import wrap_for_distributed

        forward = wrap_for_distributed(model, cfg, d, device)
    if cfg.compile:
        forward = torch.compile(forward)
    return forward


def _tensorboard(run: Run):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(log_dir=str(run.dir / "tensorboard"))
