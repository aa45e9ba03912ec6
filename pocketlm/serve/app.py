"""The HTTP side: FastAPI routes with OpenAI's request and response shapes.

GET /health (readiness; never needs the key), GET /stats (engine counters and resident memory),
GET /v1/models, POST /v1/completions, POST /v1/chat/completions. With an API key, every /v1 route
wants `Authorization: Bearer KEY`. Errors are OpenAI's {"error": {...}} with 400/401/404; a request
is validated completely (fields, model name, chat template, context length) before it reaches the
engine, so a bad request never disturbs the others.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pocketlm.errors import UserError
from pocketlm.generate import SamplingSettings, prompt_ids
from pocketlm.serve import chat
from pocketlm.serve.engine import Engine
from pocketlm.serve.jobs import Job, TokenText
from pocketlm.serve.schemas import APIError, ChatRequest, CompletionRequest

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, chat_template: str | None = None,
               default_chat_tokens: int = 512, allow_origins: list[str] | None = None,
               log: Callable[[str], None] | None = None) -> FastAPI:
    """The ASGI app serving `engine`'s model as `model_name`. `chat_template` overrides the tokenizer's;
    `allow_origins`: web pages (origins) whose scripts may call the API from a browser (CORS)."""
    log = log or (lambda line: print(f"pocketlm serve: {line}", file=sys.stderr, flush=True))
    tokenizer = engine.tokenizer
    template = chat_template or getattr(tokenizer, "chat_template", None)
    ctx = _Context(engine, model_name, template, chat.end_of_turn_ids(template, tokenizer), TokenText(tokenizer),
                   default_chat_tokens, log)
    app = FastAPI(title="pocketlm serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    if allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _install_error_handlers(app, log)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise APIError(401, "missing API key: send the header `Authorization: Bearer KEY` (the server's "
                                "--api-key)", code="invalid_api_key")
        if not secrets.compare_digest(given[7:].encode(), api_key.encode()):
            raise APIError(401, "incorrect API key: use the key the server was started with (--api-key)",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/stats")
    async def stats() -> dict:
        return {**engine.snapshot(), "rss_bytes": _rss_bytes()}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
    created = int(time.time())

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "pocketlm",
                "context_length": engine.model.config.block_size}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name:path}")
    async def model(name: str) -> dict:
        ctx.check_model(name)
        return model_card()

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await ctx.run(ctx.completion_job(body), request, bool(body.stream))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await ctx.run(ctx.chat_job(body), request, bool(body.stream))

    app.include_router(v1)
    return app


class _Context:
    def __init__(self, engine: Engine, model_name: str, template: str | None, end_ids: frozenset[int],
                 token_text: TokenText, default_chat_tokens: int, log: Callable[[str], None]) -> None:
        self.engine, self.model_name, self.template, self.end_ids = engine, model_name, template, end_ids
        self.token_text, self.default_chat_tokens, self.log = token_text, default_chat_tokens, log
        self.tokenizer = engine.tokenizer
        self.block_size = engine.model.config.block_size

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model `{name}` does not exist: this server serves `{self.model_name}` "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    def settings(self, body, max_tokens: int) -> SamplingSettings:
        try:
            return SamplingSettings(
                max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty or 1.0,
                presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                stop=list(body.stop or []), num_samples=body.n, seed=body.seed)
        except UserError as exc:
            raise APIError(400, str(exc).replace("--", "")) from exc

    def check_common(self, body) -> None:
        body.check()
        self.check_model(body.model)
        if body.n > self.engine.max_batch:
            raise APIError(400, f"n: at most {self.engine.max_batch} choices (the server's --max-batch)", param="n")

    def check_fits(self, prompts: list[list[int]], max_tokens: int, field: str) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.block_size:
            raise APIError(400, f"this model's maximum context length is {self.block_size} tokens, but "
                                f"{longest + max_tokens} were requested ({longest} in the prompt, {max_tokens} for the "
                                f"completion): shorten the prompt or lower {field}", param=field,
                           code="context_length_exceeded")

    def completion_job(self, body: CompletionRequest) -> Job:
        self.check_common(body)
        prompts, texts = self._prompts(body.prompt)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        self.check_fits(prompts, max_tokens, "max_tokens")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Job(self.engine, False, self.model_name, prompts, self.settings(body, max_tokens), self.token_text,
                   logprobs=body.logprobs, echo=texts if body.echo else None, include_usage=include_usage,
                   ignore_eos=bool(body.ignore_eos), log=self.log, path="/v1/completions")

    def _prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        """(token ids, text) per prompt: a string, strings, token ids, or lists of token ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        ids, texts = [], []
        vocab = self.engine.model.config.vocab_size
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                ids.append(prompt_ids(self.tokenizer, p))
                texts.append(p)
            else:
                if not p or any(t < 0 or t >= vocab for t in p):
                    raise APIError(400, f"prompt[{i}]: token ids must be a non-empty list of integers in "
                                        f"[0, {vocab})", param="prompt")
                ids.append(list(p))
                texts.append(self.tokenizer.decode(p))
        return ids, texts

    def chat_job(self, body: ChatRequest) -> Job:
        self.check_common(body)
        messages = [{"role": m.role, "content": m.text(i), **({"name": m.name} if m.name else {})}
                    for i, m in enumerate(body.messages)]
        ids = prompt_ids(self.tokenizer, chat.render(self.template, messages, self.tokenizer))
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.new_tokens
        if max_tokens is None:  # not given: the default, within what the context leaves
            max_tokens = max(1, min(self.default_chat_tokens, self.block_size - len(ids)))
        self.check_fits([ids], max_tokens, field)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        top = (body.top_logprobs or 0) if body.logprobs else None
        return Job(self.engine, True, self.model_name, [ids], self.settings(body, max_tokens), self.token_text,
                   stop_ids=self.end_ids, logprobs=top, include_usage=include_usage,
                   ignore_eos=bool(body.ignore_eos), log=self.log, path="/v1/chat/completions")

    async def run(self, job: Job, request: Request, stream: bool):
        job.submit()
        if stream:
            return StreamingResponse(_closing(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(_wait_disconnect(request))
        collect = asyncio.create_task(_drain(job))
        try:
            await asyncio.wait({watcher, collect}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():  # the client went away: free its rows
                collect.cancel()
                return JSONResponse({}, status_code=499)
            collect.result()
            response = job.response()
        finally:
            watcher.cancel()
            job.close(200 if job.done and not job.error else 500)
        return response


async def _drain(job: Job) -> None:
    async for _ in job.events():
        pass


async def _closing(job: Job):
    try:
        async for chunk in job.sse():
            yield chunk
    finally:  # also on a client that disconnects mid-stream (the task is cancelled)
        job.close(200 if not job.error else 500)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _install_error_handlers(app: FastAPI, log: Callable[[str], None]) -> None:
    def answer(request: Request, error: APIError) -> JSONResponse:
        log(f"{request.method} {request.url.path} {error.status} {error.message}")
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
        elif first.get("type") == "extra_forbidden":
            message, param = f"unknown field {'.'.join(loc)!r}: remove it (see the OpenAI API reference)", loc[-1]
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
            param = loc[0] if loc else None
        return answer(request, APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}: see GET /v1/models, POST /v1/completions, "
                   "POST /v1/chat/completions") if exc.status_code in (404, 405) else str(exc.detail)
        return answer(request, APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        return answer(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
