"""Teachers: whatever writes synth's samples.

- `URLTeacher`: any OpenAI-compatible server (`pocketlm serve`, llama.cpp's server, vLLM, a hosted API)
  through the official `openai` client: `/v1/completions`, or `/v1/chat/completions` with `--chat`.
  The client retries connection errors, timeouts, 429 and 5xx with exponential backoff (`--retries`);
  any other 4xx is the caller's mistake and stops the run with a one-line error.
- `LocalTeacher`: a model SOURCE that pocketlm loads in this process and samples with
  `pocketlm.generate` (one request at a time; `--chat` applies the tokenizer's chat template, as `pocketlm serve` does).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

from pocketlm.errors import UserError


@dataclass
class Sampling:
    """How every sample is drawn; part of each record and of its id."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    chat: bool = False

    def validate(self) -> None:
        from pocketlm.generate import SamplingSettings

        SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                         stop=list(self.stop))  # raises UserError for impossible values

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None = None


def is_url(teacher: str) -> bool:
    return urlparse(teacher).scheme in ("http", "https")


class Teacher:
    """`await teacher.start()`, then `await teacher.complete(prompt, sampling, seed)`; `await teacher.close()`."""

    name: str = ""
    max_concurrency: int | None = None  # None: as many requests at once as asked

    async def start(self) -> None: ...

    async def complete(self, prompt: str, sampling: Sampling, seed: int) -> Completion:
        raise NotImplementedError

    async def close(self) -> None: ...


class URLTeacher(Teacher):
    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, retries: int = 5,
                 timeout: float = 600.0) -> None:
        parsed = urlparse(url)
        # Users give the server's root or its /v1 base; the client wants the /v1 base.
        self.base_url = url.rstrip("/") + ("/v1" if parsed.path in ("", "/") else "")
        self.name = url
        self.model = model
        self.api_key = api_key or os.environ.get("POCKETLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
        self.retries = retries
        self.timeout = timeout
        self.client = None

    async def start(self) -> None:
        import openai

        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=self.retries,
                                         timeout=self.timeout)
        if self.model is None:  # the server's first model; a server without /models gets a placeholder name
            try:
                models = await self._call(self.client.models.list())
                self.model = models.data[0].id if models.data else "default"
            except UserError as exc:
                if "HTTP 404" not in str(exc):
                    raise
                self.model = "default"

    async def complete(self, prompt: str, sampling: Sampling, seed: int) -> Completion:
        common = dict(model=self.model, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                      seed=seed, **({"top_p": sampling.top_p} if sampling.top_p is not None else {}),
                      **({"stop": sampling.stop} if sampling.stop else {}))
        if sampling.chat:
            response = await self._call(self.client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], **common))
            text = response.choices[0].message.content or ""
        else:
            response = await self._call(self.client.completions.create(prompt=prompt, **common))
            text = response.choices[0].text or ""
        usage = response.usage
        return Completion(text, usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None,
                          response.choices[0].finish_reason)

    async def _call(self, awaitable):
        """The request, with the client's errors turned into one-line UserErrors."""
        import openai

        try:
            return await awaitable
        except openai.APIConnectionError as exc:  # includes timeouts; raised after the client's retries
            cause = exc.__cause__ or exc
            raise UserError(f"cannot reach the teacher at {self.base_url} ({type(cause).__name__}: {cause}) after "
                            f"{self.retries} retries: start the server (e.g. `pocketlm serve SOURCE --port 8000`) "
                            "or fix --teacher") from None
        except openai.APIStatusError as exc:
            message = _error_message(exc)
            if exc.status_code >= 500 or exc.status_code == 429:
                raise UserError(f"the teacher at {self.base_url} kept answering HTTP {exc.status_code} ({message}) "
                                f"after {self.retries} retries: check the server's log, then rerun") from None
            hint = {401: "pass --api-key (or set POCKETLM_API_KEY)", 404: "check --teacher and --teacher-model"}
            raise UserError(f"the teacher at {self.base_url} refused a request with HTTP {exc.status_code} "
                            f"({message}): {hint.get(exc.status_code, 'fix the request settings')}") from None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def _error_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"]).splitlines()[0][:200]
    return str(exc).splitlines()[0][:200]


class LocalTeacher(Teacher):
    """A model SOURCE loaded in this process; requests run one at a time."""

    max_concurrency = 1

    def __init__(self, source: str, *, device: str = "auto", adapter: str | None = None) -> None:
        self.name = source
        self.source = source
        self.device = device
        self.adapter = adapter
        self.model = None
        self.tokenizer = None

    async def start(self) -> None:
        from pocketlm.synth.models import load_for_inference

        self.model, self.tokenizer = load_for_inference(self.source, self.device, self.adapter)

    def _chat_prompt(self, prompt: str) -> tuple[str, list[str]]:
        """The prompt in the tokenizer's chat template, and the texts that end the assistant's turn."""
        from pocketlm.serve.chat import end_of_turn_ids, render
        from pocketlm.serve.schemas import APIError

        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise UserError(f"--chat needs a chat template, and {self.source}'s tokenizer has none: drop --chat, "
                            "or serve the model with `pocketlm serve SOURCE --chat-template FILE` and pass its URL")
        try:
            text = render(template, [{"role": "user", "content": prompt}], self.tokenizer)
        except APIError as exc:
            raise UserError(f"{self.source}'s chat template refused the prompt: {exc.message}") from None
        return text, [self.tokenizer.decode([i]) for i in sorted(end_of_turn_ids(template, self.tokenizer))]

    async def complete(self, prompt: str, sampling: Sampling, seed: int) -> Completion:
        from pocketlm.generate import SamplingSettings, run_generation

        stop = list(sampling.stop)
        if sampling.chat:
            prompt, ends = self._chat_prompt(prompt)
            stop += ends
        settings = SamplingSettings(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                    top_p=sampling.top_p, stop=stop, seed=seed)
        result = run_generation(self.model, self.tokenizer, prompt, settings)
        tokens = result.new_tokens[0]
        finish = "length" if tokens >= sampling.max_new_tokens else "stop"
        return Completion(result.texts[0], result.prompt_tokens, tokens, finish)


def make_teacher(teacher: str, *, model: str | None = None, api_key: str | None = None, retries: int = 5,
                 device: str = "auto", timeout: float = 600.0) -> Teacher:
    if is_url(teacher):
        return URLTeacher(teacher, model=model, api_key=api_key, retries=retries, timeout=timeout)
    return LocalTeacher(teacher, device=device)
