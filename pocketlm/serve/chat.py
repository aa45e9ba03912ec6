"""Chat templates: messages -> prompt text, with the tokenizer's own Jinja template (Hugging Face's format).

The template comes from `--chat-template FILE` (or the built-in name `chatml`), else from the
tokenizer (tokenizer_config.json's `chat_template`, or a GGUF file's `tokenizer.chat_template`: the
built-in smollm2-135m has one). A model without one answers chat requests with a 400 that says how to
pass a template; completions work either way. Rendering is sandboxed as in transformers.
"""

from __future__ import annotations

import datetime
from functools import lru_cache
from pathlib import Path

from pocketlm.errors import UserError
from pocketlm.serve.schemas import APIError

# ChatML, as SmolLM2 and Qwen use it; available as `--chat-template chatml`.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML}


def read_template(spec: str | Path) -> str:
    """`--chat-template`: a built-in name or a file holding a Jinja template."""
    if str(spec) in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[str(spec)]
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --chat-template {spec}: {exc}: give a Jinja template file or one of "
                        f"{', '.join(BUILTIN_TEMPLATES)}") from exc
    try:
        _compile(text)
    except Exception as exc:  # noqa: BLE001 - any Jinja syntax error
        raise UserError(f"--chat-template {spec} is not a valid Jinja template: {exc}") from exc
    return text


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render(template: str | None, messages: list[dict], tokenizer) -> str:
    """The prompt text for `messages`, ending where the assistant's reply starts."""
    if template is None:
        raise APIError(400, "this model has no chat template: use /v1/completions, or restart the server with "
                            "--chat-template FILE (a Jinja template as in tokenizer_config.json) or "
                            "--chat-template chatml", param="messages", code="no_chat_template")
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=True,
                                         bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
    except Exception as exc:  # noqa: BLE001 - the template's own checks (raise_exception) and Jinja errors
        raise APIError(400, f"messages: the chat template refused them: {exc}", param="messages") from exc


def end_of_turn_ids(template: str | None, tokenizer) -> frozenset[int]:
    """Special tokens that end an assistant turn in this template (e.g. <|im_end|>, <|eot_id|>): a chat
    reply stops at them as at end-of-text, even where the tokenizer's end-of-text token is another."""
    if not template:
        return frozenset()
    ids = set()
    for token_id, added in tokenizer.backend.get_added_tokens_decoder().items():
        content = added.content
        lowered = content.lower()
        if added.special and content in template and ("end" in lowered or "eot" in lowered or content == "</s>"):
            ids.add(token_id)
    return frozenset(ids)
