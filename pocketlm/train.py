"""The one training loop: pretraining and every fine-tuning method (full, LoRA, QLoRA) run through `Trainer`.

`Trainer` has torchtune's recipe shape: `setup()` (device, data, resume, optimizer), `step()` (one
optimizer step: gradient accumulation, clip, AdamW, cosine schedule), `evaluate()`, `save()`, `cleanup()`,
and `train()`, which composes them with logging, best checkpoint and early stopping. Benchmarks and
notebooks drive the same `step()`. Resuming restores weights, optimizer, RNG and data position, so every
loss after a resume equals the loss an uninterrupted run computes at that step.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from pocketlm.data.batches import TokenBatchSource
from pocketlm.data.manifest import load_manifest
from pocketlm.device import autocast, default_precision, peak_memory_bytes, precision_dtype
from pocketlm.distributed import (
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
from pocketlm.io import folders
from pocketlm.loggers import MetricLoggers
from pocketlm.memory import allocator_in_effect, release_free_memory
from pocketlm.model import GPT, get_config
from pocketlm.objectives import LMObjective, Metric, Objective, ValidationLoss, to_device
from pocketlm.preflight import check_before_training, check_run_dir
from pocketlm.recipe import (
    CPU_DEFAULT_CONTEXT,
    DEFAULT_BATCH_TOKENS,
    TrainConfig,
    add_train_arguments,
    config_from_args,
    load_recipe,
)
from pocketlm.recompute import apply_memory_budget
from pocketlm.rundir import RunDir, damaged
from pocketlm.tokenizer import Tokenizer, check_same_tokenizer, load_tokenizer

__all__ = ["TrainConfig", "Trainer", "train", "load_recipe", "add_train_arguments", "config_from_args",
           "WeightSaver", "FullModelSaver", "lr_at", "make_optimizer", "derive_batch_shape",
           "trainer_on_windows", "pretrain", "build_model"]


class WeightSaver(Protocol):
    def save(self, model: GPT, tokenizer: Tokenizer, directory: Path) -> None: ...
    def load(self, model: GPT, directory: Path) -> None: ...


class FullModelSaver:
    """Checkpoints hold a whole model folder (Hugging Face layout)."""

    def save(self, model: GPT, tokenizer: Tokenizer, directory: Path) -> None:
        folders.write_model_files(model, tokenizer, directory)

    def load(self, model: GPT, directory: Path) -> None:
        folders.load_state_into(model, folders.read_hf_weights(directory), str(directory))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; matrices decay, biases and norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu") and all(p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def derive_batch_shape(cfg: TrainConfig, model_context: int, device_type: str,
                       world: int = 1) -> tuple[TrainConfig, str | None]:
    """Fill in an unset context and batch size consistently: (the config, a line saying what was chosen).

    Context: the model's (capped by the data), but at most CPU_DEFAULT_CONTEXT on a CPU, where a base's
    8,192 would take hours a step. Batch: DEFAULT_BATCH_TOKENS rounded down to whole micro-batches of
    every context the run uses (at least one micro-batch per rank), so the divisibility check passes.
    """
    changes: dict = {}
    notes = []
    if cfg.context is None and not cfg.context_schedule:
        context = model_context
        why = "the model's, capped by the data"
        if device_type == "cpu" and context > CPU_DEFAULT_CONTEXT:
            context, why = CPU_DEFAULT_CONTEXT, f"the model's {model_context} is slow on a CPU"
        changes["context"] = context
        notes.append(f"context {context} ({why}; --context sets it)")
    if cfg.batch_tokens is None:
        contexts = [int(c) for _, c in cfg.context_schedule] if cfg.context_schedule else \
            [changes.get("context") or cfg.context or model_context]
        unit = math.lcm(*(c * cfg.micro_batch * world for c in contexts))
        batch = max(unit, DEFAULT_BATCH_TOKENS // unit * unit)
        changes["batch_tokens"] = batch
        notes.append(f"batch {batch} tokens ({batch // contexts[-1]} sequences of {contexts[-1]}, "
                     f"micro-batches of {cfg.micro_batch}; --batch-tokens sets it)")
    return (replace(cfg, **changes) if changes else cfg), ("; ".join(notes) if notes else None)


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


class Trainer:
    """One training run: `Trainer(model, tokenizer, cfg).train()` returns the summary.

    Drive it step by step instead (benchmarks do): `setup()`, then `step()` per optimizer step (returns
    the step's numbers: step, tokens, train_loss, lr, tokens_per_s, memory_bytes, context), `evaluate()`
    for the validation metric, `save()` for a checkpoint in RUN/checkpoints, `cleanup()` at the end.

    Extension points (keyword arguments; each has a default that pretraining and fine-tuning use):

    - `saver` (WeightSaver): what a checkpoint's weights are. FullModelSaver writes a model folder;
      pocketlm.io.peft.LoraSaver a PEFT adapter.
    - `objective` (pocketlm.objectives.Objective): `loss(model, batch) -> scalar tensor` for one
      micro-batch, called under autocast with the batch on the device. Default LMObjective (next-token
      cross-entropy). Distillation adds a KL term against a no-grad teacher; classification computes a
      head and cross-entropy on labels. An objective with a `setup(trainer)` method gets it called once
      the device is known (move a teacher there).
    - `batch_source`: where micro-batches come from. Needs `train_batch(context, position, count)`
      (rows position .. position+count-1 of the run's stream: a pure function of the position, which
      is all a resume restores), `val_batches(context, n_batches, micro_batch)` (an iterable),
      `max_context()` and `tokenizer_identity` (checked against the model's tokenizer; None skips).
      Default pocketlm.data.batches.TokenBatchSource(cfg.data); TensorBatchSource for in-memory windows.
    - `metric` (pocketlm.objectives.Metric): `name`, `higher_is_better`, `evaluate(trainer, context) ->
      dict`. Its `name` value picks the best checkpoint and drives early stopping (`patience`); every
      value it returns is logged in metrics.jsonl on evaluation steps. Default ValidationLoss (val_loss).
    - `prepare_model(model, cfg)`: called once in setup() before the model moves to the device, before
      resumed weights load and before the optimizer exists (QAT wraps linears with fake quantization here).
    - `extra_summary`: a dict, or a callable `(trainer) -> dict`, merged into summary.json.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, cfg: TrainConfig, *, saver: WeightSaver | None = None,
                 objective: Objective | None = None, batch_source=None, metric: Metric | None = None,
                 prepare_model: Callable[[GPT, TrainConfig], None] | None = None,
                 extra_summary: dict | Callable[[Trainer], dict] | None = None) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.saver = saver or FullModelSaver()
        self.objective = objective or LMObjective()
        self.batch_source = batch_source
        self.metric = metric or ValidationLoss()
        self.prepare_model = prepare_model
        self.extra_summary = extra_summary
        self.stopped_early = False
        self._ready = False

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Device, data, run directory, resume, optimizer: everything before the first step."""
        self.cfg.validate(require_data=self.batch_source is None)
        self.dist, self.device = init_distributed(self.cfg.device)
        self.precision = default_precision(self.device) if self.cfg.precision == "auto" else self.cfg.precision
        self.run = RunDir(self.cfg.out, self.dist.is_main)
        self._setup_data()
        self._lock = contextlib.ExitStack()
        try:
            self._lock.enter_context(self.run.lock())  # released in cleanup(), or right here on failure
            self._setup_run()
        except BaseException:
            self._lock.close()
            raise
        self.loggers = MetricLoggers(self.run, tensorboard=self.cfg.tensorboard,
                                     wandb_project=self.cfg.wandb_project, config=self.cfg.to_dict())
        self.start_step = self.state["step"]
        self.tokens_this_session = 0
        self.last_train_loss = float("nan")
        self.t_start = time.perf_counter()
        self._ready = True

    def _setup_run(self) -> None:
        """Resume (or refuse to start over a run), then the model and optimizer. config.yaml and
        metrics.jsonl are written only once the checkpoint has loaded: a failed resume changes nothing."""
        self.run.clean_temporaries()  # what a process killed mid-save left behind
        latest = self.run.resume_point()
        if self.run.has_checkpoints() and not self.cfg.resume:
            raise UserError(f"{self.run.path} already holds a run: pass --resume to continue it, "
                            "or choose another --out")
        self._setup_model()
        self.state = {"step": 0, "data_position": {}, "tokens": 0, self._best_key: None, "best_step": None,
                      "bad_evals": 0}
        saved = self._resume(latest) if self.cfg.resume else None
        self.run.write_config(self.cfg.to_dict())
        self.run.truncate_metrics(self.state["step"])  # rows a killed run logged after its checkpoint
        # The optimizer comes after wrapping: FSDP2 replaces the parameters with sharded ones.
        self.forward = _wrap_model(self.model, self.cfg, self.dist, self.device)
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        if saved is not None:
            load_optimizer_state(self.model, self.optimizer, saved["optimizer"])
        if hasattr(self.objective, "setup"):
            self.objective.setup(self)
        if self.device.type == "cpu":
            release_free_memory()  # setting up left freed copies behind: not part of training's footprint

    @property
    def _best_key(self) -> str:
        return f"best_{self.metric.name}"

    def _setup_data(self) -> None:
        """The batch source, the tokenizer check, and the context and batch when the recipe leaves them unset."""
        cfg = self.cfg
        if self.batch_source is None:
            self.batch_source = TokenBatchSource(cfg.data, cfg.seed)
        identity = getattr(self.batch_source, "tokenizer_identity", None)
        if identity is not None:  # a model must never train on another tokenizer's ids
            check_same_tokenizer(identity, self.tokenizer.identity, self.batch_source.description,
                                 f"model {cfg.model}")
        self.model_context = min(self.model.config.block_size, self.batch_source.max_context())
        self.cfg, note = derive_batch_shape(cfg, self.model_context, self.device.type, self.dist.world_size)
        if isinstance(self.batch_source, TokenBatchSource):  # every refusal before the first step
            check_before_training(self.cfg, self.model.config.block_size, self.batch_source.train_split,
                                  self.batch_source.val_split, self.dist.world_size)
        else:
            check_run_dir(self.cfg.out)
        if note and self.dist.is_main:
            print(f"{self.cfg.method} {self.run.path.name}: {note}", file=sys.stderr)

    def _setup_model(self) -> None:
        model, cfg = self.model, self.cfg
        if cfg.dropout is not None:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = cfg.dropout
        if self.prepare_model is not None:
            self.prepare_model(model, cfg)
        model.to(self.device)
        store_frozen_linears(model, self.precision)
        model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.max_memory and not cfg.activation_checkpointing:  # the least recomputation that fits
            longest = max([int(c) for _, c in cfg.context_schedule or []] + [cfg.context_at(0, self.model_context)])
            apply_memory_budget(model, cfg, self.device, self.precision, longest)
        if cfg.compile_blocks:
            model.compile_blocks()
        model.train()

    def _resume(self, latest: Path | None) -> dict | None:
        """Weights, RNG and trainer state from the latest checkpoint; the optimizer state is returned."""
        if latest is None:
            if self.dist.is_main:
                print(f"no checkpoint in {self.run.path} yet: starting from step 0", file=sys.stderr)
            return None
        state, saved = self.run.read_trainer_state(latest)  # damaged: one line, before anything changes
        if not {"optimizer", "rng"} <= set(saved):
            raise damaged(latest, "trainer_state.pt lacks the optimizer or RNG state")
        self.saver.load(self.model, latest)
        _set_rng_state(saved["rng"])
        self.state = state
        if self.dist.is_main:
            print(f"resuming {self.run.path} from step {state['step']}", file=sys.stderr)
        return saved

    # -- one step -----------------------------------------------------------------------------------
    def step(self) -> dict:
        """One optimizer step over batch_tokens tokens (all ranks together); returns its numbers."""
        if not self._ready:
            self.setup()
        cfg, state = self.cfg, self.state
        step, world = state["step"], self.dist.world_size
        context = cfg.context_at(step, self.model_context)
        per_step = cfg.batch_tokens // context  # windows in one global batch
        accum = accumulation_steps(cfg.batch_tokens, context, cfg.micro_batch, world)
        key = str(context)
        position = state["data_position"].get(key, 0) + self.dist.rank * (per_step // world)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = self.batch_source.train_batch(context, position + micro * cfg.micro_batch, cfg.micro_batch)
            batch = to_device(batch, self.device)
            # Under DDP, gradients are all-reduced only on the last micro-batch of the step.
            with grad_sync(self.forward, last_micro_batch=micro == accum - 1):
                with autocast(self.device, self.precision):
                    loss = self.objective.loss(self.forward, batch)
                (loss / accum).backward()
            loss_sum += loss.detach()
        train_loss = all_reduce_mean(loss_sum / accum, self.dist).item()
        if not math.isfinite(train_loss):  # before the update: the weights in memory stay the last good ones
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged("training loss", train_loss, step + 1)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        state["data_position"][key] = state["data_position"].get(key, 0) + per_step
        state["tokens"] += per_step * context
        state["step"] = step + 1
        self.tokens_this_session += per_step * context
        self.last_train_loss = train_loss
        return {"step": step + 1, "tokens": state["tokens"], "train_loss": round(train_loss, 6), "lr": lr,
                "tokens_per_s": round(per_step * context / elapsed, 1),
                "memory_bytes": peak_memory_bytes(self.device), "context": context}

    def _diverged(self, what: str, value: float, step: int) -> UserError:
        kept = self.run.resume_point()
        where = f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was written"
        return UserError(f"the {what} became {value} at step {step}: training stopped without saving it, and "
                         f"{where}: lower --lr, raise --warmup-steps or keep --grad-clip on, then --resume "
                         "or start a new run")

    # -- evaluation, samples, checkpoints -----------------------------------------------------------
    def evaluate(self) -> dict:
        """The validation metric at the current context, plus generation metrics when cfg.eval_prompts is set."""
        if not self._ready:
            self.setup()
        context = self.cfg.context_at(max(0, self.state["step"] - 1), self.model_context)
        values = dict(self.metric.evaluate(self, context))
        if self.cfg.eval_prompts and (self.dist.is_main or is_sharded(self.model)):  # FSDP2: all ranks run it
            from pocketlm.eval.during_training import evaluate_during_training

            values.update(evaluate_during_training(self.model, self.tokenizer, self.cfg))
        return values

    def record_evaluation(self, values: dict) -> bool:
        """Update best and patience from an evaluation; True when it is the best so far."""
        value, best = values[self.metric.name], self.state.get(self._best_key)
        better = best is None or (value > best if self.metric.higher_is_better else value < best)
        if better:
            self.state.update({self._best_key: value, "best_step": self.state["step"], "bad_evals": 0})
        else:
            self.state["bad_evals"] += 1
        self.stopped_early = self.cfg.patience > 0 and self.state["bad_evals"] >= self.cfg.patience
        return better

    def save(self, is_best: bool = False) -> None:
        """A checkpoint of the current step (every rank calls it: FSDP2 gathers the weights)."""
        full_model, optimizer_state = checkpoint_state(self.model, self.optimizer)
        if self.run.is_main:
            self.run.save_checkpoint(
                self.state["step"], lambda folder: self.saver.save(full_model, self.tokenizer, folder),
                self.state, {"optimizer": optimizer_state, "rng": _rng_state()},
                is_best=is_best, keep=self.cfg.keep_checkpoints)
        barrier(self.dist)

    def sample(self) -> None:
        """A sample from cfg.sample_prompt into RUN/samples.jsonl."""
        from pocketlm.generate import SamplingSettings, generate

        cfg = self.cfg
        settings = SamplingSettings(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed)
        was_training = self.model.training
        self.model.eval()
        text = generate(self.model, self.tokenizer, cfg.sample_prompt, settings)[0]
        self.model.train(was_training)
        self.run.append_sample({"step": self.state["step"], "prompt": cfg.sample_prompt, "text": text})

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        """Steps until max_steps (or early stopping) with logging, evaluation and checkpoints; the summary."""
        if not self._ready:
            self.setup()
        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=self.state["step"], desc=f"{cfg.method} {self.run.path.name}",
                   disable=not self.dist.is_main, file=sys.stderr, dynamic_ncols=True)
        try:
            while self.state["step"] < cfg.max_steps and not self.stopped_early:
                row = self._train_one(self.step())
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                                **({"val": f"{row[self.metric.name]:.3f}"} if self.metric.name in row else {}))
        finally:
            bar.close()
            self.cleanup()
        if self.stopped_early and self.dist.is_main:
            print(f"early stopping at step {self.state['step']}: no improvement in {cfg.patience} evaluations",
                  file=sys.stderr)
        summary = self.summary()
        self.run.write_summary(summary)
        return summary

    def _train_one(self, info: dict) -> dict:
        """Evaluate, sample, log and checkpoint after the step that `info` describes."""
        cfg, done = self.cfg, info["step"]
        evaluate = done % cfg.eval_every == 0 or done == cfg.max_steps
        is_best = False
        if evaluate:
            values = self.evaluate()
            value = values.get(self.metric.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise self._diverged(self.metric.name, value, done)
            is_best = self.record_evaluation(values)
            info.update({k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()})
        if cfg.sample_every and done % cfg.sample_every == 0 and (self.dist.is_main or is_sharded(self.model)):
            self.sample()
        if done % cfg.log_every == 0 or done == cfg.max_steps or evaluate:
            self.loggers.log(info)
        save_every = cfg.save_every or cfg.eval_every
        if is_best or done % save_every == 0 or done == cfg.max_steps or self.stopped_early:
            self.save(is_best)
        return info

    def summary(self) -> dict:
        cfg, state = self.cfg, self.state
        wall = time.perf_counter() - self.t_start
        extra = self.extra_summary(self) if callable(self.extra_summary) else (self.extra_summary or {})
        return {
            "method": cfg.method, "model": cfg.model, "data": cfg.data, "steps": state["step"],
            "tokens": state["tokens"], "final_train_loss": self.last_train_loss,
            "best_val_loss": state.get("best_val_loss"), self._best_key: state.get(self._best_key),
            "best_metric": self.metric.name, "best_step": state["best_step"],
            "stopped_early": self.stopped_early, "wall_s": round(wall, 2),
            "tokens_per_s": round(self.tokens_this_session / wall, 1) if wall > 0 else None,
            "peak_memory_bytes": peak_memory_bytes(self.device), "device": str(self.device),
            "precision": self.precision, "context": cfg.context, "batch_tokens": cfg.batch_tokens,
            "allocator": allocator_in_effect() if self.device.type == "cpu" else None,
            "parameters": self.model.num_parameters(),
            "trainable_parameters": self.model.num_parameters(trainable_only=True),
            "world_size": self.dist.world_size, **extra,
        }

    def cleanup(self) -> None:
        """Close the metric loggers (TensorBoard, W&B) and release the run directory; safe to call twice."""
        if getattr(self, "loggers", None) is not None:
            self.loggers.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.close()


def train(model: GPT, tokenizer: Tokenizer, cfg: TrainConfig, *, saver: WeightSaver | None = None,
          extra_summary: dict | None = None, **extensions) -> dict:
    """Train `model` with `cfg` and return the summary: `Trainer(...).train()` (see Trainer for `extensions`).

    With `cfg.teacher` set (and no objective given), the objective is logit distillation (pocketlm.distill)."""
    if cfg.teacher and "objective" not in extensions:
        from pocketlm.distill import distillation_objective

        extensions["objective"] = distillation_objective(cfg)
        extra_summary = {**(extra_summary or {}), "distill": {"teacher": cfg.teacher, "alpha": cfg.distill_alpha,
                                                             "temperature": cfg.distill_temperature}}
    return Trainer(model, tokenizer, cfg, saver=saver, extra_summary=extra_summary, **extensions).train()


@torch.no_grad()
def evaluate_loss(model: GPT, batches, n_batches: int, micro_batch: int, device, precision: str) -> float:
    """Mean LM loss over the first n_batches * micro_batch windows of `batches` (a data.batches.Batches),
    exactly as the Trainer's default validation metric computes it."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    windows = min(batches.n, n_batches * micro_batch)
    try:
        for start in range(0, windows, micro_batch):
            x, y = batches.get(start, min(micro_batch, windows - start))
            with autocast(device, precision):
                loss = LMObjective().loss(model, (x.to(device), y.to(device)))
            total += loss.item() * x.shape[0]
            count += x.shape[0]
    finally:
        model.train(was_training)
    return total / count


def trainer_on_windows(model: GPT, tokenizer: Tokenizer, windows: torch.Tensor, *, out: str | Path,
                       lr: float, steps: int, val_windows: torch.Tensor | None = None, **settings) -> Trainer:
    """A set-up Trainer whose step i trains on windows[i] ((steps, batch, context + 1) token ids, reused
    cyclically), at a constant learning rate: what benchmarks and notebooks drive `step()` with.

    `settings` are further TrainConfig fields (precision, device, weight_decay, grad_clip,
    activation_checkpointing, ...); `val_windows` (n, batch, context + 1) feed `evaluate()`.
    """
    from pocketlm.data.batches import TensorBatchSource

    batch, context = windows.shape[-2], windows.shape[-1] - 1
    n_val = val_windows.shape[0] if val_windows is not None else 1
    values = dict(model=model.config.name, out=str(out), lr=lr, max_steps=steps, warmup_steps=0, min_lr_ratio=1.0,
                  batch_tokens=batch * context, micro_batch=batch, context=context, eval_every=steps,
                  eval_batches=n_val, log_every=steps, keep_checkpoints=1)
    cfg = TrainConfig(**{**values, **settings})
    trainer = Trainer(model, tokenizer, cfg, batch_source=TensorBatchSource(windows, val_windows))
    trainer.setup()
    return trainer


def build_model(name: str, data_dir: str, seed: int, pad_vocab: int | None = None) -> tuple[GPT, Tokenizer]:
    """A freshly initialised model whose vocabulary is the data set's tokenizer."""
    load_manifest(data_dir)  # a clear error if DIR is not a prepared data set
    tokenizer = load_tokenizer(data_dir)
    vocab = tokenizer.vocab_size
    padded = -(-vocab // pad_vocab) * pad_vocab if pad_vocab else None
    config = get_config(name, vocab_size=vocab, padded_vocab_size=padded, tokenizer=tokenizer.name)
    torch.manual_seed(seed)  # the same seed gives the same initial weights
    return GPT(config), tokenizer


def pretrain(cfg: TrainConfig, *, pad_vocab: int | None = None, log=print) -> dict:
    """Train cfg.model (a named config, see `pocketlm models`) from random weights on cfg.data; the summary."""
    cfg = replace(cfg, method="pretrain")
    cfg.validate()
    model, tokenizer = build_model(cfg.model, cfg.data, cfg.seed, pad_vocab)
    log(f"model {cfg.model}: {model.num_parameters():,} parameters; data {cfg.data}; run {cfg.out}")
    return train(model, tokenizer, cfg)


def store_frozen_linears(model: torch.nn.Module, precision: str) -> None:
    """Under bf16/fp16 autocast, hold frozen linear weights of the blocks (a LoRA run's base) in that
    dtype. Autocast casts them to it on every use anyway, so the numbers are identical; holding them
    cast halves their memory and saves two casts per layer per step. Embeddings and norms stay fp32."""
    if precision not in ("bf16", "fp16"):
        return
    dtype = precision_dtype(precision)
    for module in model.transformer.h.modules():
        if type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)


def _wrap_model(model: GPT, cfg: TrainConfig, d, device: torch.device):
    """DDP (or FSDP2) under torchrun, torch.compile if asked; the plain model otherwise."""
    forward = model
    if d.enabled:
        from pocketlm.distributed import wrap_for_distributed

        forward = wrap_for_distributed(model, cfg, d, device)
    if cfg.compile:
        forward = torch.compile(forward)
    return forward
