"""Sampling with a KV cache: one batched decode loop for every sample of a prompt.

The prompt is fed once (prefill) into a preallocated `KVCache`; then each step feeds one token per
still-running sample and reads back only the last position's logits. Samples that finish (end-of-text
or a stop string) are dropped from the batch, so later steps cost less.

Context policy: a prompt whose tokens plus `max_new_tokens` do not fit in the model's context
(`block_size`) is refused with a UserError that says how many tokens fit, never silently cropped, so an
evaluation never scores a completion of a prompt it did not see.

Filters follow Hugging Face's order: repetition penalty, temperature, top-k, top-p (OpenAI's presence
and frequency penalties, used by `pocketlm serve`, come right after the repetition penalty). Temperature 0
is greedy decoding (argmax after the penalties). The server's batched decoder (pocketlm/serve/engine.py)
uses the same `processed_logits`.
"""

from __future__ import annotations

import math
import sys
import time
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import pocketlm
from pocketlm.device import model_device
from pocketlm.errors import UserError
from pocketlm.kv_cache import StaticKVCache

# -- settings -------------------------------------------------------------------------------------


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # 1 means off; > 1 discourages repeats (CTRL / Hugging Face)
    presence_penalty: float = 0.0  # OpenAI's additive penalties on generated tokens; 0 means off
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    num_samples: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError for settings no sampler could honour (the CLI flags share these names)."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, got {self.top_k!r}: omit it to keep every token")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p!r}: e.g. 0.9 keeps the top 90% of mass")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise UserError(f"{name} must be in [-2, 2] (0 = off), got {value!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise UserError(f"--num-samples must be a positive integer, got {self.num_samples!r}")
        if any(not s for s in self.stop):
            raise UserError("--stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# -- filters (pure: they return new tensors and never modify their input) --------------------------


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as Hugging Face applies it: for every token in `token_ids` (B, L), divide its
    logit by `penalty` if positive, multiply if negative. logits: (B, V)."""
    if penalty == 1.0 or token_ids.numel() == 0:
        return logits
    scores = logits.gather(1, token_ids)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, token_ids, scores)  # repeated ids write the same value: counted once


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError("temperature 0 is greedy decoding: take the argmax instead of scaling")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept), set the rest to -inf."""
    if k is None or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches `p`.

    A token is kept when the mass of the tokens ranked above it is still below p, so the most likely
    token is always kept.
    """
    if p is None or p >= 1.0:
        return logits
    # Fast exact path: a peaked distribution's nucleus lies within its few hundred most likely tokens,
    # and a top-k is far cheaper than sorting the vocabulary (about 7 ms a row for 50k tokens on a CPU).
    # A row whose k-th token is already dropped keeps no token past it; only the other rows go on to a
    # larger k, and finally to the sort.
    shape, vocab = logits.shape, logits.size(-1)
    flat = logits.reshape(-1, vocab)
    lse = torch.logsumexp(flat.float(), dim=-1, keepdim=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    todo = torch.arange(flat.size(0), device=flat.device)
    k = 128
    while todo.numel() and k < vocab // 4:
        values, order = torch.topk(flat[todo], k, dim=-1)
        probs = (values.float() - lse[todo]).exp()
        mass_before = probs.cumsum(dim=-1) - probs
        done = mass_before[:, -1] >= p
        if bool(done.any()):
            keep_sorted = mass_before[done] < p
            keep_sorted[:, 0] = True
            keep[todo[done]] = torch.zeros_like(flat[todo[done]], dtype=torch.bool).scatter(-1, order[done],
                                                                                             keep_sorted)
        todo, k = todo[~done], k * 8
    if todo.numel():
        sorted_logits, order = torch.sort(flat[todo], dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        keep_sorted = mass_before < p
        keep_sorted[:, 0] = True
        keep[todo] = keep_sorted.scatter(-1, order, keep_sorted)  # back to vocabulary order
    return logits.masked_fill(~keep.reshape(shape), float("-inf"))


def apply_presence_frequency_penalty(logits: torch.Tensor, generated: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties: subtract `presence` from the logit of every token generated so far and
    `frequency` times its count. generated: (B, N) token ids, -1 = padding. logits: (B, V)."""
    if (presence == 0.0 and frequency == 0.0) or generated.numel() == 0:
        return logits
    valid = generated >= 0
    counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    counts.scatter_add_(1, generated.clamp(min=0), valid.float())
    return logits - (frequency * counts + presence * (counts > 0).float()).to(logits.dtype)


def processed_logits(logits: torch.Tensor, settings: SamplingSettings, history: torch.Tensor | None = None,
                     generated: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits (B, V) after every filter `settings` asks for: the penalties, then (when
    sampling) temperature, top-k and top-p. Greedy decoding takes their argmax; sampling draws from
    their softmax. `history`: prompt + generated ids for the repetition penalty; `generated`: the
    generated ids alone (-1 = padding) for the presence/frequency penalties."""
    if history is not None:
        logits = apply_repetition_penalty(logits, history, settings.repetition_penalty)
    if generated is not None:
        logits = apply_presence_frequency_penalty(logits, generated, settings.presence_penalty,
                                                  settings.frequency_penalty)
    if settings.greedy:
        return logits
    logits = apply_temperature(logits.float(), settings.temperature)
    return top_p_filter(top_k_filter(logits, settings.top_k), settings.top_p)


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per row of `probs` (B, V, need not sum to 1) for `uniforms` (B,)
    in [0, 1). One random number and one cumulative sum per row, where torch.multinomial draws a random
    number per vocabulary entry: the server's batched sampler uses this. Zero-probability tokens are
    never drawn."""
    cdf = probs.float().cumsum(dim=-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)


def next_tokens(logits: torch.Tensor, settings: SamplingSettings, history: torch.Tensor | None = None,
                generator: torch.Generator | None = None, generated: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row (B,) from last-position logits (B, V) under `settings`."""
    logits = processed_logits(logits, settings, history, generated)
    if settings.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


# -- the decode loop ------------------------------------------------------------------------------

# on_step(rows, tokens) -> per-row "stop now" flags, or None. rows: original batch rows still running;
# tokens: the token each of them just produced. Both are CPU lists.
StepCallback = Callable[[list[int], list[int]], list[bool] | None]


def check_fits(prompt_tokens: int, max_new_tokens: int, block_size: int) -> None:
    if prompt_tokens + max_new_tokens > block_size:
        room = block_size - prompt_tokens
        fix = f"lower --max-new-tokens to {room}" if room > 0 else "shorten the prompt"
        raise UserError(
            f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens ({max_new_tokens}) is longer than the "
            f"model's context of {block_size} tokens: {fix}"
        )


def compiled_step(model) -> Callable:
    """step(tokens (B, 1), cache=StaticKVCache) -> (logits, None): `model` compiled as one graph (fullgraph,
    static shapes), one per model object.

    Eager decoding of a small model on a CPU spends most of each token launching about a thousand small ops
    from Python; compiled, the elementwise work fuses into a few C++ kernels and the step is one call. The
    first step of a new (model, batch, cache length) compiles: about 10-40 s on 2 cores (inductor keeps what
    it built in its on-disk cache, so the next process compiles faster).

    Checking dynamo's guards on every module took about 1 ms a token, so module guards are skipped. That is
    safe because each model gets a function with a code object of its own (dynamo keeps graphs per code
    object), so no other model can match this one's graph; the weights are graph inputs, so in-place updates
    are seen, but replacing a layer of this model afterwards needs a new model object.
    """
    entry = model.__dict__.get("_compiled_decode_step")
    if entry is not None and entry[0]() is model:  # (a deep copy carries its original's entry: not its own)
        return entry[1]

    def forward(idx: torch.Tensor, cache: StaticKVCache):
        return model(idx, cache=cache)

    from pocketlm.compress.modules import prepare_kernels

    prepare_kernels(model)
    own = types.FunctionType(forward.__code__.replace(), forward.__globals__, closure=forward.__closure__)
    # (inductor's cpp_wrapper took a further ~20% off an int4 token, but compiling its C++ took over 10 minutes
    # for bf16 and int8 models on 2 cores: not used.)
    # Inductor's own kernels (norms, rotary embeddings, residual adds) run on one thread: on a decode step's few
    # rows, starting an OpenMP team for the largest of them cost more than it saved (int4 smollm2, 2 cores:
    # about 7% more tokens/s, pairs of runs in one process). The matmuls (external ops) keep every thread.
    step = torch.compile(own, fullgraph=True, dynamic=False,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "cpp.threads": 1})
    object.__setattr__(model, "_compiled_decode_step", (weakref.ref(model), step))  # not a submodule
    return step


def compile_decode(model, batch_size: int, max_len: int) -> float:
    """Compile the decode step for (batch_size, cache of max_len) ahead of time, on a throwaway cache, so that
    timings of the generation after it measure decoding; returns the seconds it took."""
    started = time.perf_counter()
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = StaticKVCache(model.new_cache(batch_size, max_len))
            compiled_step(model)(torch.zeros(batch_size, 1, dtype=torch.long, device=device), cache=cache)
    finally:
        model.train(was_training)
    return time.perf_counter() - started


def _decode(model, idx: torch.Tensor, settings: SamplingSettings, eos_id: int | None,
            on_step: StepCallback | None = None, compiled: bool = False) -> torch.Tensor:
    B, T = idx.shape
    n = settings.max_new_tokens
    check_fits(T, n, model.config.block_size)
    device = idx.device
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed)
    out = torch.full((B, n), eos_id if eos_id is not None else 0, dtype=torch.long, device=device)
    # Prompt + generated tokens, only needed by the repetition penalty.
    history = None
    if settings.repetition_penalty != 1.0:
        history = torch.cat([idx, torch.zeros(B, n, dtype=torch.long, device=device)], dim=1)
    rows = torch.arange(B, device=device)  # original rows still running

    # Identical prompts (num_samples > 1) are prefilled once and the cache copied to every row.
    shared = B > 1 and bool((idx == idx[:1]).all())
    cache = model.new_cache(1 if shared else B, T + n)
    logits = model(idx[:1] if shared else idx, cache=cache)[0][:, -1, :]
    if shared:
        cache.reorder(torch.zeros(B, dtype=torch.long, device=device))
        logits = logits.expand(B, -1)
    # Compiled: every step feeds all B rows at fixed shapes (rows that ended decode on, unread).
    static = StaticKVCache(cache) if compiled else None
    step_fn = compiled_step(model) if compiled else model
    fed = torch.zeros(B, 1, dtype=torch.long, device=device)

    step = 0
    penalize = settings.presence_penalty != 0.0 or settings.frequency_penalty != 0.0
    for step in range(n):
        seen = history[:, : T + step] if history is not None else None
        generated = out[rows, :step] if penalize else None
        tok = next_tokens(logits, settings, seen, generator, generated)
        out[rows, step] = tok
        if history is not None:
            history[:, T + step] = tok
        finished = tok == eos_id if eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
        if on_step is not None:
            flags = on_step(rows.tolist(), tok.tolist())
            if flags is not None:
                finished |= torch.tensor(flags, dtype=torch.bool, device=device)
        if step == n - 1:
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows, tok = rows[keep], tok[keep]
            if static is None:
                cache.reorder(keep)
            if history is not None:
                history = history[keep]
        if static is None:
            logits = model(tok[:, None], cache=cache)[0][:, -1, :]
        else:
            fed[rows, 0] = tok
            logits = step_fn(fed, cache=static)[0][rows, -1, :]
    return out[:, : step + 1]


def generate_tokens(model, idx: torch.Tensor, settings: SamplingSettings, eos_id: int | None,
                    on_step: StepCallback | None = None, compiled: bool = False) -> torch.Tensor:
    """New tokens (B, N) after the prompts `idx` (B, T), N <= settings.max_new_tokens.

    All rows share the prompt length T (no padding). A row ends at `eos_id` (included in its output);
    the positions after it hold `eos_id`. N is shorter than max_new_tokens when every row ended early.
    `settings.num_samples` is ignored here: the batch is `idx`. `compiled`: decode steps run as one graph
    compiled by torch.compile (see compiled_step), the same tokens as the eager loop.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError("generate_tokens needs prompts of shape (batch, length >= 1)")
    settings.validate()
    was_training = model.training
    model.eval()  # dropout off while sampling; the training loop samples mid-run
    try:
        with torch.inference_mode():
            return _decode(model, idx.to(model_device(model)), settings, eos_id, on_step, compiled)
    finally:
        model.train(was_training)


# -- text -----------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Token ids in, stable text out: what a terminal may print now.

    Decodes the tokens since the last emitted piece together with a little context before them (the
    approach of text-generation-inference), so that (1) bytes of one UTF-8 character split across
    tokens are held back until the character is complete, (2) tokenizers that drop a leading space at
    the start of a decode still produce it. Text that could be the start of a stop string is held back
    too, so a stop string is never printed.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, context: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.ids: list[int] = list(context or [])
        self.prefix_offset = 0  # start of the ids decoded as context
        self.read_offset = len(self.ids)  # ids before this are already in self.text
        self.text = ""  # completion so far (cut at a stop string)
        self.emitted = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was found
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        """Add one token; return the text that became safe to print (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._append(full[len(prefix) :])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The rest, including an incomplete character at the very end (as a full decode shows it)."""
        if not self.stopped:
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.ids[self.prefix_offset :])
            if len(full) > len(prefix):
                self._append(full[len(prefix) :])
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        if not self.stop:
            return
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._partial_stop()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def _partial_stop(self) -> int:
        """Length of the longest end of self.text that is the start of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


@dataclass
class Generation:
    texts: list[str]  # one completion per sample, after the prompt
    new_tokens: list[int]  # tokens each sample produced (an end-of-text token counts)
    prompt_tokens: int
    seconds: float  # wall time, prefill included
    first_token_seconds: float  # prefill + first sampling step
    compile_seconds: float = 0.0  # compiling the decode step (compiled=True), before `seconds` started

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else float("nan")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from BOS, else end-of-text (GPT-2's convention)."""
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise UserError("the prompt is empty and the tokenizer has no BOS or end-of-text token to start "
                            "from: give a --prompt")
        ids = [start]
    return ids


def run_generation(model, tokenizer, prompt: str, settings: SamplingSettings,
                   on_text: Callable[[int, str], None] | None = None, compiled: bool = False) -> Generation:
    """`generate`, plus token counts and timings (`compiled`: the decode step is compiled first, untimed)."""
    settings.validate()
    ids = prompt_ids(tokenizer, prompt)
    eos_id = tokenizer.eos_id
    B = settings.num_samples
    check_fits(len(ids), settings.max_new_tokens, model.config.block_size)
    compile_seconds = compile_decode(model, B, len(ids) + settings.max_new_tokens) if compiled else 0.0
    decoders = [IncrementalDecoder(tokenizer, settings.stop, context=ids[-4:]) for _ in range(B)]
    counts = [0] * B
    started = time.perf_counter()
    first: list[float] = []

    def on_step(rows: list[int], tokens: list[int]) -> list[bool]:
        if not first:
            first.append(time.perf_counter() - started)
        flags = []
        for r, t in zip(rows, tokens):
            counts[r] += 1
            if t == eos_id:
                flags.append(True)
                continue
            piece = decoders[r].push(t)
            if piece and on_text is not None:
                on_text(r, piece)
            flags.append(decoders[r].stopped)
        return flags

    idx = torch.tensor([ids] * B, dtype=torch.long, device=model_device(model))
    generate_tokens(model, idx, settings, eos_id, on_step, compiled)
    for r, d in enumerate(decoders):
        piece = d.finish()
        if piece and on_text is not None:
            on_text(r, piece)
    seconds = time.perf_counter() - started
    return Generation([d.text for d in decoders], counts, len(ids), seconds, first[0] if first else seconds,
                      compile_seconds)


def generate(model, tokenizer, prompt: str, settings: SamplingSettings | None = None,
             on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """`settings.num_samples` completions of `prompt` (the text after it), sampled as one batch.

    A sample ends at the tokenizer's end-of-text token, at a stop string (cut before it), or after
    max_new_tokens. `on_text(sample_index, piece)` streams each sample's text as it becomes stable.
    """
    return run_generation(model, tokenizer, prompt, settings or SamplingSettings(), on_text).texts


def generate_from_source(source, prompt: str | Callable[[], str] = "", *, adapter=None, device: str = "auto",
                         max_new_tokens: int = 128, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, repetition_penalty: float = 1.0, stop: Sequence[str] = (),
                         num_samples: int = 1, seed: int | None = None, precision: str = "auto",
                         compile: bool = False, on_text: Callable[[int, str], None] | None = None, json_out=None,
                         log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """`pocketlm generate SOURCE` as a call (`pocketlm.generate(SOURCE, PROMPT, ...)`): load SOURCE (a run
    directory, model folder, built-in base, .gguf or Hub id; `adapter` a LoRA adapter folder or run), sample
    `num_samples` completions of `prompt` and return what `--json` writes: `samples` (the texts after the
    prompt), `new_tokens`, `prompt_tokens`, `seconds`, `tokens_per_s`, `first_token_seconds`, `settings`,
    `device`, `precision`. The arguments are the command's flags; `precision` (auto, fp32, bf16, fp16) is the
    dtype float weights are held in (auto: bf16 where the hardware runs it natively, else fp32); `compile`
    compiles the decode step first (see compiled_step; its time is `compile_seconds`, outside `seconds`);
    `on_text(sample, piece)` streams each sample's text.
    `prompt` may be a function returning it, called once the settings are checked (the command reads
    stdin only then).
    """
    from pocketlm.device import check_inference_precision, pick_device
    from pocketlm.io import load_model

    # Settings first: a bad value fails before a model is loaded.
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop=list(stop), num_samples=num_samples,
                                seed=seed)
    if json_out is not None:
        from pocketlm.atomic import check_output_file

        check_output_file(json_out, "--json")
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"--adapter {adapter} is not a folder: give the adapter folder a LoRA run saved")
    where = pick_device(device)
    check_inference_precision(precision)  # before the prompt is read
    text = prompt() if callable(prompt) else prompt
    model, tokenizer = load_model(source, adapter=adapter, device=where, precision=precision)
    if not text:
        log("pocketlm generate: no prompt given: sampling unconditionally")
    if compile:
        log("pocketlm generate: compiling the decode step (torch.compile; 10-40 s on a small CPU, once per process)")
    result = run_generation(model, tokenizer, text, settings, on_text=on_text, compiled=compile)
    record = {"source": str(source), "adapter": str(adapter) if adapter else None, "prompt": text,
              "settings": asdict(settings), "samples": result.texts, "new_tokens": result.new_tokens,
              "prompt_tokens": result.prompt_tokens, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s,
              "first_token_seconds": result.first_token_seconds, "compiled": compile,
              "compile_seconds": result.compile_seconds, "device": str(where),
              "precision": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if json_out is not None:
        from pocketlm.atomic import atomic_write_json

        atomic_write_json(json_out, record)
    return record


__all__ = [
    "Generation", "IncrementalDecoder", "SamplingSettings", "apply_presence_frequency_penalty",
    "apply_repetition_penalty", "apply_temperature", "check_fits", "compile_decode", "compiled_step", "draw_tokens",
    "generate", "generate_from_source", "generate_tokens", "next_tokens", "processed_logits", "prompt_ids",
    "run_generation",
    "top_k_filter", "top_p_filter",
]


pocketlm._make_callable(__name__)  # pocketlm.generate(SOURCE, PROMPT, ...) is generate_from_source
