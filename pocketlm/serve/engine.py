"""The serving engine: a request queue feeding one batched decode loop (continuous batching).

One background thread owns the model. Each iteration it
1. admits waiting requests while batch rows are free, prefilling each prompt in chunks of at most
   `prefill_chunk` tokens per iteration (a long prompt is spread over several iterations, so the
   requests already decoding are not stalled for the whole prompt), then samples its first tokens.
   Short prompts that wait together are prefilled together, in one forward pass over a ragged
   `BatchKVCache` (right-padded to the longest; padded tokens count against the budget): on a CPU a
   forward pass over a few tokens costs about as much as one over a single token (reading the
   weights dominates), so 8 requests that arrive at once cost one prefill instead of 8, and the
   running ones are stalled once;
2. runs one decode step for every running sequence at once: one forward pass over a
   `BatchKVCache` whose rows have different lengths, then sampling per group of equal settings.
A sequence that finishes (end-of-text, a stop token or string, max_tokens) or whose client went away
leaves the batch at once, and a new request takes its row at the next iteration. The batch cache is
freed with its last row; after `trim_after_s` idle the allocator hands the memory back to the OS.

Sampling is generate.py's `processed_logits` (penalties, temperature, top-k, top-p) and `draw_tokens`
(inverse-CDF: one uniform per row, so sampling a row costs O(vocabulary) once): rows with the same
settings are filtered together; a seeded choice draws its uniforms from its own generator, so its output
does not depend on what else is in the batch. Events go back to each request through its `emit` callback,
once per iteration (the app turns them into HTTP responses or SSE chunks).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pocketlm.device import model_device
from pocketlm.generate import IncrementalDecoder, SamplingSettings, draw_tokens, processed_logits
from pocketlm.memory import release_free_memory


@dataclass
class Token:
    choice: int
    token: int
    text: str  # text that became safe to send (held back while it may start a stop string)
    logprob: float | None = None  # log-probability under the model (before sampling filters)
    top: list[tuple[int, float]] | None = None  # most likely alternatives, when asked for


@dataclass
class Finish:
    choice: int
    reason: str  # "stop" or "length"
    text: str  # the rest of the text
    completion_tokens: int


@dataclass
class PromptLogprobs:  # for echo with logprobs: one entry per prompt token (None for the first)
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Failure:
    message: str


Event = Token | Finish | PromptLogprobs | Failure


@dataclass(eq=False)
class Request:
    """One prompt with `settings.num_samples` choices. `emit` is called from the engine thread."""

    prompt: list[int]
    settings: SamplingSettings
    emit: Callable[[list[Event]], None]
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # alternatives per token (0 = only the chosen token's); None = off
    prompt_logprobs: bool = False
    first_choice: int = 0  # choice index of this prompt's first sample in the response
    ignore_eos: bool = False  # run to max_tokens through end-of-text (benchmarks)
    cancelled: bool = False  # set by the app when the client goes away
    cache: object = None  # single-row KVCache while the prompt is prefilled
    prefilled: int = 0


@dataclass(eq=False)
class _Sequence:
    request: Request
    choice: int
    ids: list[int]  # prompt + generated, for the repetition penalty
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    finish: str | None = None


@dataclass
class EngineStats:
    decode_steps: int = 0
    batched_steps: int = 0  # decode steps that advanced two or more sequences together
    max_rows: int = 0  # most sequences advanced by one decode step
    rows_decoded: int = 0  # sum over decode steps of the sequences advanced
    prefill_tokens: int = 0
    prefill_passes: int = 0  # forward passes spent on prompts
    grouped_prefills: int = 0  # of those, passes that prefilled two or more prompts together
    prefill_seconds: float = 0.0  # engine time spent admitting (prefill, first tokens, their events)
    decode_seconds: float = 0.0  # engine time spent in decode steps (forward, sampling, events)
    generated_tokens: int = 0
    requests: int = 0
    cancelled: int = 0
    failed: int = 0
    trims: int = 0  # times the idle engine handed freed memory back to the OS


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 64, prefill_chunk: int = 128) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.trim_after_s = 1.0  # idle this long, then memory goes back to the OS
        self.device = model_device(model)
        self.cache = model.new_batch_cache()
        self.running: list[_Sequence] = []  # row i of the cache is running[i]
        self.waiting: collections.deque[Request] = collections.deque()
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._stop = False
        self._rng = torch.Generator(device=self.device)
        self._rng.seed()
        self._thread = threading.Thread(target=self._loop, name="pocketlm-engine", daemon=True)

    # -- the app's side ---------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        with self._cond:
            self.waiting.append(request)
            self.stats.requests += 1
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """The client left: its rows are freed at the next iteration (a plain flag: no lock needed)."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def snapshot(self) -> dict:
        rows, length = self.cache.capacity
        return {**self.stats.__dict__, "running": len(self.running), "waiting": len(self.waiting),
                "cache_rows": rows, "cache_positions": length, "cache_bytes": self.cache.nbytes(),
                "max_batch": self.max_batch}

    # -- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        worked = False  # since memory was last handed back
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stop or self.waiting or self.running):
                        # Idle a moment (not between the back-to-back requests of one client): hand the
                        # freed batch cache back to the OS, outside the lock (trimming can take 100 ms).
                        if worked and not self._cond.wait(timeout=self.trim_after_s):
                            break
                        if not worked:
                            self._cond.wait()
                    if self._stop:
                        return
                    idle = not (self.waiting or self.running)
                if idle:
                    release_free_memory()
                    self.stats.trims += 1
                    worked = False
                    continue
                worked = True
                try:
                    started = time.perf_counter()
                    self._admit()
                    admitted = time.perf_counter()
                    self.stats.prefill_seconds += admitted - started
                    if self.running:
                        self._decode_step()
                        self.stats.decode_seconds += time.perf_counter() - admitted
                except Exception as exc:  # noqa: BLE001 - a failed step must not take the server down
                    self._fail_all(f"{type(exc).__name__}: {exc}")

    def _admit(self) -> None:
        """Prefill waiting requests (oldest first) within this iteration's token budget."""
        budget = self.prefill_chunk
        while budget > 0:
            with self._cond:
                if not self.waiting:
                    return
                request = self.waiting[0]
                if request.cancelled:
                    self.waiting.popleft()
                    self.stats.cancelled += 1
                    continue
                if len(self.running) + request.settings.num_samples > self.max_batch:
                    return  # wait for rows to free up
                group = self._short_prompts(budget)
            if len(group) >= 2:
                budget -= self._prefill_group(group)
                continue
            try:
                budget -= self._prefill_chunk(request, budget)
            except Exception as exc:  # noqa: BLE001 - this request's failure only
                with self._cond:
                    self.waiting.popleft()
                self.stats.failed += 1
                request.emit([Failure(f"{type(exc).__name__}: {exc}")])
                continue
            if request.prefilled == len(request.prompt):
                with self._cond:
                    self.waiting.popleft()

    def _short_prompts(self, budget: int) -> list[Request]:
        """Waiting requests from the head, not yet started, whose whole prompts fit in `budget` tokens
        when right-padded to the longest of them and whose choices fit in the free rows. Called
        with the lock held."""
        group: list[Request] = []
        rows, longest = len(self.running), 0
        for request in self.waiting:
            if request.cancelled:
                continue
            size = max(longest, len(request.prompt))
            rows += request.settings.num_samples
            if request.prefilled or rows > self.max_batch or size * (len(group) + 1) > budget:
                break
            group.append(request)
            longest = size
        return group

    def _prefill_group(self, group: list[Request]) -> int:
        """Prefill the prompts of `group` in one forward pass and start their choices; returns the
        budget used (the padded tokens). A failure fails these requests only."""
        with self._cond:
            for request in group:
                self.waiting.remove(request)
        T = max(len(r.prompt) for r in group)
        try:
            cache = self.model.new_batch_cache()
            cache.add_rows(len(group))
            cache.feed([len(r.prompt) for r in group])
            ids = torch.tensor([r.prompt + [r.prompt[-1]] * (T - len(r.prompt)) for r in group], dtype=torch.long,
                               device=self.device)
            logits = self.model(ids, cache=cache)[0][:, -1, :]
        except Exception as exc:  # noqa: BLE001 - these requests' failure only
            self.stats.failed += len(group)
            for request in group:
                request.emit([Failure(f"{type(exc).__name__}: {exc}")])
            return len(group) * T
        self.stats.prefill_passes += 1
        self.stats.grouped_prefills += 1
        for row, request in enumerate(group):
            request.prefilled = len(request.prompt)
            self.stats.prefill_tokens += len(request.prompt)
            try:
                events = [self._prompt_logprobs(request)] if request.prompt_logprobs else []
                self._start_choices(request, logits[row : row + 1], events, source=cache, row=row)
            except Exception as exc:  # noqa: BLE001 - this request's failure only
                self.stats.failed += 1
                request.emit([Failure(f"{type(exc).__name__}: {exc}")])
        return len(group) * T

    def _prefill_chunk(self, request: Request, budget: int) -> int:
        """Feed up to `budget` more prompt tokens; after the last chunk, start the choices."""
        prompt = request.prompt
        if request.cache is None:
            request.cache = self.model.new_cache(1, len(prompt))
        start = request.prefilled
        end = min(len(prompt), start + budget)
        ids = torch.tensor([prompt[start:end]], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=request.cache)[0][:, -1, :]
        request.prefilled = end
        self.stats.prefill_tokens += end - start
        self.stats.prefill_passes += 1
        if end == len(prompt):
            events = [self._prompt_logprobs(request)] if request.prompt_logprobs else []
            self._start_choices(request, logits, events, source=request.cache)
            request.cache = None
        return end - start

    def _prompt_logprobs(self, request: Request) -> PromptLogprobs:
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        logprobs = self.model(ids)[0][0, :-1].float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
        top = _top(logprobs, request.logprobs or 0)
        return PromptLogprobs([None, *chosen], [None, *top] if top is not None else [None] * len(request.prompt))

    def _start_choices(self, request: Request, logits: torch.Tensor, events: list[Event], source, row: int = 0) -> None:
        """Sample each choice's first token from `logits` (1, V); the prompt's keys and values are row
        `row` of `source` (a KVCache or BatchKVCache), copied into one batch row per running choice."""
        settings = request.settings
        n = settings.num_samples
        context = request.prompt[-4:]
        seqs = []
        for j in range(n):
            generator = None
            if settings.seed is not None:  # choice j draws from its own stream: seed + j
                generator = torch.Generator(device=self.device)
                generator.manual_seed((settings.seed + j) % 2**64)
            seqs.append(_Sequence(request, request.first_choice + j, list(request.prompt),
                                  IncrementalDecoder(self.tokenizer, settings.stop, context=context), generator))
        tokens, logprobs = self._sample(seqs, logits.expand(n, -1))
        survivors = self._advance(seqs, tokens, logprobs, events)
        request.emit(events)
        if survivors:  # one cache row per choice still running, each a copy of the prompt's
            self.cache.append(source, copies=len(survivors), row=row)
            self.running.extend(survivors)

    def _decode_step(self) -> None:
        self._drop_cancelled()
        if not self.running:
            return
        last = torch.tensor([s.generated[-1] for s in self.running], dtype=torch.long, device=self.device)
        logits = self.model(last[:, None], cache=self.cache)[0][:, -1, :]
        rows = len(self.running)
        self.stats.decode_steps += 1
        self.stats.batched_steps += rows >= 2
        self.stats.max_rows = max(self.stats.max_rows, rows)
        self.stats.rows_decoded += rows
        tokens, logprobs = self._sample(self.running, logits)
        by_request: dict[int, tuple[Request, list[Event]]] = {}
        for seq in self.running:
            by_request.setdefault(id(seq.request), (seq.request, []))
        for i, seq in enumerate(self.running):
            self._advance([seq], tokens[i : i + 1], logprobs[i : i + 1], by_request[id(seq.request)][1])
        for request, events in by_request.values():
            if events:
                request.emit(events)
        for i in range(len(self.running) - 1, -1, -1):
            if self.running[i].finish:
                self._remove(i)

    def _remove(self, row: int) -> None:
        moved = self.cache.remove(row)
        if moved is not None:
            self.running[row] = self.running[moved]
        self.running.pop()

    def _drop_cancelled(self) -> None:
        gone = set()
        for i in range(len(self.running) - 1, -1, -1):
            if self.running[i].request.cancelled:
                gone.add(id(self.running[i].request))
                self._remove(i)
        self.stats.cancelled += len(gone)

    def _fail_all(self, message: str) -> None:
        requests = {id(s.request): s.request for s in self.running}
        self.running.clear()
        self.cache = self.model.new_batch_cache()
        for request in requests.values():
            self.stats.failed += 1
            request.emit([Failure(message)])

    # -- sampling and bookkeeping -----------------------------------------------------------------
    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> tuple[list[int], list]:
        """One token per sequence (row i of logits is seqs[i]), and its log-probabilities if asked."""
        tokens = [0] * len(seqs)
        groups: dict[tuple, list[int]] = {}
        for i, seq in enumerate(seqs):
            s = seq.request.settings
            key = (s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.presence_penalty, s.frequency_penalty)
            groups.setdefault(key, []).append(i)
        for rows in groups.values():
            for i, token in zip(rows, self._sample_group([seqs[i] for i in rows], logits, rows)):
                tokens[i] = token
        logprobs: list = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.request.logprobs is not None]
        if want:
            index = torch.tensor(want, device=logits.device)
            lp = logits[index].float().log_softmax(dim=-1)
            chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in want], device=logits.device))[:, 0].tolist()
            k = max(seqs[i].request.logprobs for i in want)
            top = _top(lp, k)
            for j, i in enumerate(want):
                alternatives = top[j][: seqs[i].request.logprobs] if top is not None else None
                logprobs[i] = (chosen[j], alternatives)
        return tokens, logprobs

    def _sample_group(self, seqs: list[_Sequence], logits: torch.Tensor, rows: list[int]) -> list[int]:
        settings = seqs[0].request.settings
        index = torch.tensor(rows, device=logits.device)
        group = logits[index] if len(rows) != logits.shape[0] else logits
        history = generated = None
        if settings.repetition_penalty != 1.0:  # pad with each row's first id: a repeat counts once
            width = max(len(s.ids) for s in seqs)
            history = torch.tensor([s.ids + [s.ids[0]] * (width - len(s.ids)) for s in seqs], device=logits.device)
        if settings.presence_penalty or settings.frequency_penalty:
            width = max(1, max(len(s.generated) for s in seqs))
            generated = torch.tensor([s.generated + [-1] * (width - len(s.generated)) for s in seqs],
                                     device=logits.device)
        filtered = processed_logits(group, settings, history, generated)
        if settings.greedy:
            return filtered.argmax(dim=-1).tolist()
        # One uniform per row: from the choice's own generator when seeded (the same seed gives the same
        # output whatever else is in the batch), else from the engine's.
        shared = sum(s.generator is None for s in seqs)
        pool = iter(torch.rand(shared, generator=self._rng, device=self._rng.device).tolist())
        uniforms = [float(torch.rand(1, generator=s.generator, device=s.generator.device)) if s.generator is not None
                    else next(pool) for s in seqs]
        probs = (filtered - filtered.amax(dim=-1, keepdim=True)).exp()  # softmax up to a factor draw ignores
        return draw_tokens(probs, torch.tensor(uniforms, device=logits.device)).tolist()

    def _advance(self, seqs: list[_Sequence], tokens: list[int], logprobs: list, events: list[Event]) -> list:
        """Record one new token per sequence; returns the sequences still running."""
        eos = self.tokenizer.eos_id
        alive = []
        for seq, token, lp in zip(seqs, tokens, logprobs):
            request = seq.request
            seq.generated.append(token)
            seq.ids.append(token)
            self.stats.generated_tokens += 1
            ends = (token == eos or token in request.stop_ids) and not request.ignore_eos
            text = "" if ends else seq.decoder.push(token)
            chosen, top = lp if lp is not None else (None, None)
            events.append(Token(seq.choice, token, text, chosen, top))
            if ends or seq.decoder.stopped:
                seq.finish = "stop"
            elif len(seq.generated) >= request.settings.max_new_tokens:
                seq.finish = "length"
            if seq.finish:
                events.append(Finish(seq.choice, seq.finish, seq.decoder.finish(), len(seq.generated)))
            else:
                alive.append(seq)
        return alive


def _top(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]] | None:
    if k <= 0:
        return None
    values, ids = logprobs.topk(k, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """True once nothing runs or waits (tests and benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.running and not engine.waiting:
            return True
        time.sleep(0.01)
    return False
