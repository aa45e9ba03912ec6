"""One API call as engine requests, and the engine's events as OpenAI responses or SSE chunks.

A call with P prompts and n choices submits P engine requests (choice index = prompt * n + j, as the
OpenAI API numbers them) and gathers their events from the engine thread through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pocketlm.generate import SamplingSettings
from pocketlm.serve.engine import Engine, Failure, Finish, PromptLogprobs, Request, Token
from pocketlm.serve.schemas import APIError


class TokenText:
    """A token's text and exact bytes, for logprobs (byte-level BPE tokens map back to bytes)."""

    def __init__(self, tokenizer) -> None:
        from pocketlm.io.gguf import _byte_spelling

        self.tokenizer = tokenizer
        self._bytes_of = {c: b for b, c in _byte_spelling().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            text = self.tokenizer.decode([token])
            piece = self.tokenizer.backend.id_to_token(token) or ""
            if piece and all(c in self._bytes_of for c in piece) and token not in self._special():
                raw = bytes(self._bytes_of[c] for c in piece)
            else:
                raw = text.encode("utf-8")
            self._cache[token] = (text, list(raw))
        return self._cache[token]

    def _special(self) -> set[int]:
        if not hasattr(self, "_special_ids"):
            self._special_ids = set(self.tokenizer.backend.get_added_tokens_decoder())
        return self._special_ids


def _finite(x: float | None) -> float | None:
    return None if x is None else (x if math.isfinite(x) else -9999.0)


@dataclass
class Choice:
    index: int
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Job:
    """One /v1/completions or /v1/chat/completions call."""

    engine: Engine
    chat: bool
    model_name: str
    prompts: list[list[int]]
    settings: SamplingSettings
    token_text: TokenText
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # alternatives per token; None = no logprobs
    echo: list[str] | None = None  # completions with echo: each prompt's text
    include_usage: bool = False
    ignore_eos: bool = False
    log: Callable[[str], None] = print
    path: str = ""

    def __post_init__(self) -> None:
        n = self.settings.num_samples
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = [Choice(i) for i in range(len(self.prompts) * n)]
        self.requests: list[Request] = []
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.done = False
        self.error: str | None = None
        self._queue: asyncio.Queue | None = None
        self.streamed = False

    # -- running ----------------------------------------------------------------------------------
    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = queue = asyncio.Queue()
        n = self.settings.num_samples
        for p, prompt in enumerate(self.prompts):
            def emit(events, p=p):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (p, events))
                except RuntimeError:  # the event loop has closed (server shutting down)
                    pass

            request = Request(prompt, self.settings, emit, stop_ids=self.stop_ids, logprobs=self.logprobs,
                              prompt_logprobs=self.echo is not None and self.logprobs is not None,
                              first_choice=p * n, ignore_eos=self.ignore_eos)
            self.requests.append(request)
            self.engine.submit(request)

    async def events(self) -> AsyncIterator[tuple[int, list]]:
        """(prompt index, events) until every choice has finished or the engine failed the call."""
        assert self._queue is not None, "submit first"
        remaining = len(self.choices)
        while remaining:
            p, events = await self._queue.get()
            for event in events:
                if isinstance(event, Token) and self.first_token is None:
                    self.first_token = time.perf_counter() - self.started
                if isinstance(event, Finish):
                    remaining -= 1
                if isinstance(event, Failure):
                    self.error, remaining = event.message, 0
            self._record(p, events)
            yield p, events
        self.done = True

    def _record(self, p: int, events: list) -> None:
        n = self.settings.num_samples
        for event in events:
            if isinstance(event, PromptLogprobs):
                for c in self.choices[p * n : (p + 1) * n]:
                    c.tokens[:0], c.logprobs[:0], c.top[:0] = self.prompts[p], event.logprobs, event.top
            elif isinstance(event, Token):
                c = self.choices[event.choice]
                c.text.append(event.text)
                c.tokens.append(event.token)
                c.logprobs.append(event.logprob)
                c.top.append(event.top)
            elif isinstance(event, Finish):
                c = self.choices[event.choice]
                c.text.append(event.text)
                c.finish_reason, c.completion_tokens = event.reason, event.completion_tokens

    def close(self, status: int = 200) -> None:
        """Cancel whatever still runs (the client left) and write the request's log line."""
        if not self.done:
            for request in self.requests:
                self.engine.cancel(request)
        seconds = time.perf_counter() - self.started
        first = f"{self.first_token * 1000:.0f} ms" if self.first_token is not None else "-"
        state = "" if self.done else " (client left: cancelled)"
        if self.error:
            state = f" (failed: {self.error})"
        self.log(f"POST {self.path} {status} prompt={self.usage()['prompt_tokens']} "
                 f"completion={self.usage()['completion_tokens']} tokens in {seconds:.2f}s, first token "
                 f"{first}{', streamed' if self.streamed else ''}{state}")

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.completion_tokens or len(c.tokens) - self._echoed(c) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _echoed(self, c: Choice) -> int:
        if self.echo is None or self.logprobs is None:
            return 0
        return len(self.prompts[c.index // self.settings.num_samples])

    # -- responses --------------------------------------------------------------------------------
    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    def response(self) -> dict:
        if self.error:
            raise APIError(500, f"generation failed: {self.error}", code="engine_error")
        choices = []
        for c in self.choices:
            text = "".join(c.text)
            if self.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": text, "refusal": None},
                                "logprobs": self._chat_logprobs(c, 0), "finish_reason": c.finish_reason})
            else:
                prefix = self.echo[c.index // self.settings.num_samples] if self.echo is not None else ""
                choices.append({"index": c.index, "text": prefix + text, "finish_reason": c.finish_reason,
                                "logprobs": self._completion_logprobs(c, 0, len(c.tokens), 0)})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage(), "system_fingerprint": None}

    def _completion_logprobs(self, c: Choice, start: int, end: int, offset: int) -> dict | None:
        if self.logprobs is None:
            return None
        texts = [self.token_text(t)[0] for t in c.tokens[start:end]]
        offsets = []
        for t in texts:
            offsets.append(offset)
            offset += len(t)
        tops = [None if top is None else {self.token_text(t)[0]: _finite(v) for t, v in top}
                for top in c.top[start:end]]
        return {"tokens": texts, "token_logprobs": [_finite(x) for x in c.logprobs[start:end]],
                "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, c: Choice, start: int, end: int | None = None) -> dict | None:
        if self.logprobs is None:
            return None
        content = []
        for t, lp, top in zip(c.tokens[start:end], c.logprobs[start:end], c.top[start:end]):
            text, raw = self.token_text(t)
            alternatives = [{"token": self.token_text(a)[0], "logprob": _finite(v), "bytes": self.token_text(a)[1]}
                            for a, v in (top or [])]
            content.append({"token": text, "logprob": _finite(lp), "bytes": raw, "top_logprobs": alternatives})
        return {"content": content, "refusal": None}

    # -- streaming --------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: dict | None = None, final: bool = False) -> str:
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}
        if self.include_usage:
            body["usage"] = usage if final else None
        if self.chat:
            body["system_fingerprint"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        """The response as Server-Sent Events, as the openai client parses them."""
        self.streamed = True
        sent = {c.index: 0 for c in self.choices}  # entries of each choice's logprobs already sent
        offsets = {c.index: 0 for c in self.choices}  # characters sent (completions' text_offset)
        if self.chat:  # the role comes first, as OpenAI sends it
            yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for c in self.choices])
        elif self.echo is not None and self.logprobs is None:  # the prompts' text first
            yield self._chunk([self._echo(c, sent, offsets) for c in self.choices])
        async for p, events in self.events():
            if self.error:
                err = APIError(500, f"generation failed: {self.error}", code="engine_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            parts = []
            for event in events:
                if isinstance(event, PromptLogprobs):  # echo with logprobs: the prompt, scored, on its own
                    n = self.settings.num_samples
                    yield self._chunk([self._echo(c, sent, offsets) for c in self.choices[p * n : (p + 1) * n]])
                elif isinstance(event, Token | Finish):
                    part = self._delta(event, sent, offsets)
                    if part is not None and parts and isinstance(event, Finish) and \
                            parts[-1]["index"] == part["index"]:  # one entry: the last token and the end
                        self._merge(parts[-1], part)
                    elif part is not None:
                        parts.append(part)
            if parts:
                yield self._chunk(parts)
        if self.include_usage:
            yield self._chunk([], self.usage(), final=True)
        yield "data: [DONE]\n\n"

    def _echo(self, c: Choice, sent: dict, offsets: dict) -> dict:
        assert self.echo is not None
        p = c.index // self.settings.num_samples
        scored = len(self.prompts[p]) if self.logprobs is not None else 0
        lp = self._completion_logprobs(c, 0, scored, 0)
        sent[c.index], offsets[c.index] = scored, len(self.echo[p])
        return {"index": c.index, "text": self.echo[p], "logprobs": lp, "finish_reason": None}

    def _merge(self, last: dict, finish: dict) -> None:
        last["finish_reason"] = finish["finish_reason"]
        if self.chat:
            extra = finish["delta"].get("content", "")
            if extra:
                last["delta"]["content"] = last["delta"].get("content", "") + extra
        else:
            last["text"] += finish["text"]

    def _delta(self, event: Token | Finish, sent: dict, offsets: dict) -> dict | None:
        c = self.choices[event.choice]
        finish = event.reason if isinstance(event, Finish) else None
        text = event.text
        if isinstance(event, Token) and not text and self.logprobs is None:
            return None  # held back (a partial character or stop string): nothing to send yet
        lp = None
        if isinstance(event, Token) and self.logprobs is not None:
            i = sent[c.index]
            sent[c.index] = i + 1
            lp = self._chat_logprobs(c, i, i + 1) if self.chat else self._completion_logprobs(c, i, i + 1,
                                                                                              offsets[c.index])
        offsets[c.index] += len(text)
        if self.chat:
            return {"index": c.index, "delta": {"content": text} if text or not finish else {}, "logprobs": lp,
                    "finish_reason": finish}
        return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}
