"""`pocketlm serve`: a real server on a free loopback port, driven by the official openai client.

The model is a small random GPT-2 made here (a 2,048-token context, so long requests stay cheap);
outputs are checked against pocketlm.generate on the same model, and the engine's counters show that
concurrent requests really shared decode steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from pocketlm.generate import SamplingSettings, apply_presence_frequency_penalty, generate
from pocketlm.io import save_model
from pocketlm.model import GPT, ModelConfig
from pocketlm.serve import start
from pocketlm.serve.engine import wait_idle
from pocketlm.tokenizer import load_tokenizer

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["ROMEO: But soft", "To be, or not to be, that is the question: whether 'tis nobler in the mind",
           "A", "The quality of mercy is not strained; it droppeth as the gentle rain"]


def _model(family: str = "gpt2") -> GPT:
    torch.manual_seed(3)
    if family == "gpt2":
        cfg = ModelConfig(name="serve-tiny", family="gpt2", n_layer=2, n_head=2, n_embd=64, block_size=2048)
    else:
        cfg = ModelConfig(name="serve-llama", family="llama", vocab_size=50257, block_size=512, n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=64, intermediate_size=96, bias=False, tie_embeddings=False)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def server(model, tok):
    torch.set_num_threads(1)
    lines: list[str] = []
    # prefill_chunk 16: the longer prompts are prefilled over several iterations, between decode steps
    srv = start(model, tok, model_name="tiny", chat_template=TEMPLATE, max_batch=8, prefill_chunk=16,
                log=lines.append)
    srv.lines = lines
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, content type, body bytes) of a plain HTTP call: what the openai client hides."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def _greedy(model, tok, prompt: str, n: int, stop=None) -> str:
    return generate(model, tok, prompt, SamplingSettings(max_new_tokens=n, temperature=0, stop=stop or []))[0]


# -- the batched KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batch_cache_decodes_rows_of_different_lengths_like_full_recomputation(family):
    model = _model(family)
    prompts = [torch.randint(0, 50257, (1, n)) for n in (5, 13, 2)]
    with torch.inference_mode():
        expected = []
        for p in prompts:  # no cache at all: the whole sequence every step
            ids = p
            for _ in range(6):
                ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], 1)
            expected.append(ids[0, p.shape[1]:].tolist())
        cache, got = model.new_batch_cache(), []
        for p in prompts:
            single = model.new_cache(1, p.shape[1])
            got.append([int(model(p, cache=single)[0][0, -1].argmax())])
            cache.append(single)
        for _ in range(5):
            logits = model(torch.tensor([g[-1] for g in got])[:, None], cache=cache)[0][:, -1]
            for g, t in zip(got, logits.argmax(-1).tolist()):
                g.append(t)
        assert got == expected
        assert cache.lengths == [10, 18, 7]
        assert cache.remove(0) == 2 and cache.lengths == [7, 18]  # the last row moved into the hole
        cache.remove(1)
        cache.remove(0)
        assert cache.nbytes() == 0  # empty: storage freed


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ragged_batch_prefill_equals_one_prompt_at_a_time(family):
    """Prompts of different lengths prefilled together (right-padded, `feed`) give each prompt's own
    last-token logits and keys/values: decoding on from them matches prompts prefilled one by one."""
    model = _model(family)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (5, 13, 1)]
    with torch.inference_mode():
        single, expected = model.new_batch_cache(), []
        for p in prompts:
            c = model.new_cache(1, len(p))
            expected.append(model(torch.tensor([p]), cache=c)[0][0, -1])
            single.append(c)
        ragged = model.new_batch_cache()
        ragged.add_rows(3)
        ragged.feed([len(p) for p in prompts])
        T = max(len(p) for p in prompts)
        padded = torch.tensor([p + [7] * (T - len(p)) for p in prompts])  # padding: any token
        logits = model(padded, cache=ragged)[0][:, -1]
        assert ragged.lengths == [5, 13, 1]
        torch.testing.assert_close(logits, torch.stack(expected), rtol=1e-4, atol=1e-4)
        merged = model.new_batch_cache()  # rows copied out of the ragged cache, as the engine does
        for row in (2, 0, 1):
            merged.append(ragged, row=row)
        assert merged.lengths == [1, 5, 13]
        nxt = torch.tensor([[int(logits[r].argmax())] for r in (2, 0, 1)])
        a = model(nxt, cache=merged)[0][:, -1]
        b = model(nxt, cache=_reordered(model, single, (2, 0, 1)))[0][:, -1]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError):
            ragged.feed([1, 2])  # one count per row


def _reordered(model, cache, order):
    out = model.new_batch_cache()
    for r in order:
        out.append(cache, row=r)
    return out


def test_prompts_that_wait_together_are_prefilled_in_one_pass(model, tok):
    """Short prompts queued together cost one prefill pass; each request's greedy text is still generate's."""
    from pocketlm.serve.engine import Engine, Finish, Request, Token

    prompts = ["ROMEO: But soft", "A", "To be, or not", "Hello"]
    engine = Engine(model, tok, max_batch=8, prefill_chunk=128)
    texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    done = threading.Semaphore(0)

    def emit_for(i):
        def emit(events):
            for e in events:
                if isinstance(e, Token | Finish):
                    texts[i].append(e.text)
                if isinstance(e, Finish):
                    done.release()
        return emit

    def run_queued(engine, max_new_tokens):  # all waiting before the engine thread starts
        for i, prompt in enumerate(prompts):
            settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
            engine.submit(Request(tok.encode(prompt), settings, emit_for(i)))
        engine.start()
        try:
            for _ in prompts:
                assert done.acquire(timeout=60)
        finally:
            engine.stop()

    run_queued(engine, 20)
    assert engine.stats.prefill_passes == 1 and engine.stats.grouped_prefills == 1
    assert engine.stats.prefill_seconds > 0 and engine.stats.decode_seconds > 0
    assert engine.stats.prefill_tokens == sum(len(tok.encode(p)) for p in prompts)
    for i, prompt in enumerate(prompts):
        assert "".join(texts[i]) == _greedy(model, tok, prompt, 20)
    # a budget smaller than the padded group: the prompts are prefilled in several passes
    engine = Engine(model, tok, max_batch=8, prefill_chunk=8)
    run_queued(engine, 2)
    assert engine.stats.prefill_passes >= 2


def test_presence_and_frequency_penalties_subtract_per_generated_token():
    logits = torch.zeros(1, 4)
    out = apply_presence_frequency_penalty(logits, torch.tensor([[1, 1, 3, -1]]), presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -1.0, 0.0, -0.75]]


# -- completions ------------------------------------------------------------------------------------


def test_concurrent_requests_share_decode_steps_and_match_generate(server, client, model, tok):
    before = server.engine.snapshot()
    results: dict[int, openai.types.Completion] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def call(i: int) -> None:
        barrier.wait()
        results[i] = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=150, temperature=0)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.engine.snapshot()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["rows_decoded"] - before["rows_decoded"]
    # 4 x 149 decode rows: done one after another they would take 596 steps; batched, far fewer.
    assert rows == len(PROMPTS) * 149
    assert steps < rows / 2, (steps, rows)
    assert after["max_rows"] >= 3
    for i, prompt in enumerate(PROMPTS):
        choice = results[i].choices[0]
        assert choice.text == _greedy(model, tok, prompt, 150)  # batching changes nothing
        assert choice.finish_reason == "length"
        assert results[i].usage.completion_tokens == 150
        assert results[i].usage.prompt_tokens == len(tok.encode(prompt))


def test_n_and_prompt_lists_number_choices_and_count_usage(client, tok):
    r = client.completions.create(model="tiny", prompt=["Hello", "Good night"], max_tokens=7, n=2, seed=5,
                                  logprobs=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny" and r.created > 0
    produced = sum(len(c.logprobs.tokens) for c in r.choices)
    assert r.usage.completion_tokens == produced == 4 * 7
    assert r.usage.prompt_tokens == len(tok.encode("Hello")) + len(tok.encode("Good night"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # token-id prompts are accepted too
    ids = tok.encode("Hello")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=7, temperature=0)
    assert by_ids.choices[0].text == client.completions.create(model="tiny", prompt="Hello", max_tokens=7,
                                                               temperature=0).choices[0].text


def test_stop_string_cuts_text_and_usage_counts_tokens_actually_produced(client, model, tok):
    full = _greedy(model, tok, PROMPTS[0], 40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "@@"],
                                  logprobs=1)
    choice = r.choices[0]
    assert choice.text == full[: full.index(stop)]
    assert choice.finish_reason == "stop"
    assert r.usage.completion_tokens == len(choice.logprobs.tokens) < 40
    # the tokens produced are exactly those up to the one that completed the stop string
    assert stop in "".join(choice.logprobs.tokens) and stop not in "".join(choice.logprobs.tokens[:-1])


def test_seed_repeats_output_and_choices_differ(client):
    def sample(seed, n=1):
        r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=1.0, seed=seed, n=n)
        return [c.text for c in r.choices]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    two = sample(7, n=2)
    assert two[0] == first[0] and two[1] != two[0]


def test_logprobs_are_the_models_and_echo_returns_the_prompt(client, model, tok):
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    ids = tok.encode(prompt)
    assert c.text.startswith(prompt)
    assert c.logprobs.tokens[: len(ids)] == [tok.decode([i]) for i in ids]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    all_ids = ids + [tok.encode(c.text[len(prompt):])[0]]
    with torch.inference_mode():
        expected = model(torch.tensor([all_ids]))[0][0].log_softmax(-1)
    for pos in range(1, len(all_ids)):
        assert c.logprobs.token_logprobs[pos] == pytest.approx(float(expected[pos - 1, all_ids[pos]]), abs=1e-4)
        assert len(c.logprobs.top_logprobs[pos]) == 2
        assert max(c.logprobs.top_logprobs[pos].values()) == pytest.approx(float(expected[pos - 1].max()), abs=1e-4)
    assert c.logprobs.text_offset[: 2] == [0, len(tok.decode([ids[0]]))]
    assert r.usage.completion_tokens == 3
    chunks = list(client.completions.create(model="tiny", prompt=[prompt, "Hi"], n=2, max_tokens=3, temperature=0,
                                            logprobs=2, echo=True, stream=True))
    assert all(len({x.index for x in chunk.choices}) == len(chunk.choices) for chunk in chunks)  # one entry each
    streamed = "".join(x.text for chunk in chunks for x in chunk.choices if x.index == 1)
    assert streamed == c.text
    tokens = [t for chunk in chunks for x in chunk.choices if x.index == 1 for t in x.logprobs.tokens]
    assert tokens == c.logprobs.tokens


def test_streaming_completion_matches_and_usage_chunk_only_when_asked(client, model, tok):
    expected = _greedy(model, tok, PROMPTS[1], 30)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert "".join(c.choices[0].text for c in chunks[:-1]) == expected


def test_sse_wire_format(server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    status, kind, raw = _http("POST", server.url + "/v1/completions", body)
    assert status == 200 and kind.startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


# -- chat ---------------------------------------------------------------------------------------------


def test_chat_uses_the_template_streams_and_reports_logprobs(client, model, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    rendered = "<system>Be brief.\n<user>Hello!\n<assistant>"
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant"
    assert choice.message.content == _greedy(model, tok, rendered, 10)
    assert r.usage.prompt_tokens == len(tok.encode(rendered)) and r.usage.completion_tokens == 10
    assert len(choice.logprobs.content) == 10 and all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    first = choice.logprobs.content[0]
    assert bytes(first.bytes).decode() == first.token and first.logprob == first.top_logprobs[0].logprob
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_without_a_template_is_a_clear_400(model, tok):
    srv = start(model, tok, model_name="plain", log=lambda _line: None)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--chat-template"):
            c.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        assert c.completions.create(model="plain", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        srv.stop()


def test_a_quantized_folder_serves_the_same_greedy_text_as_generate(tmp_path, tok):
    from pocketlm.compress.api import quantize
    from pocketlm.io import load_model

    save_model(_model("llama"), tok, tmp_path / "float")
    quantize(tmp_path / "float", "int8", tmp_path / "int8", progress=False)
    model, tokenizer = load_model(tmp_path / "int8")
    srv = start(model, tokenizer, model_name="q", log=lambda _line: None)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        for prompt in PROMPTS[:2]:
            r = c.completions.create(model="q", prompt=prompt, max_tokens=12, temperature=0)
            assert r.choices[0].text == _greedy(model, tokenizer, prompt, 12)
    finally:
        srv.stop()


# -- errors, keys, disconnects ------------------------------------------------------------------------


def test_errors_have_openai_shape_and_status(server, client):
    cases = [
        (openai.NotFoundError, dict(model="gpt-4", prompt="x"), "model_not_found"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", temperature=3), None),
        (openai.BadRequestError, dict(model="tiny", prompt="x", top_p=0), None),
        (openai.BadRequestError, dict(model="tiny", prompt="x", n=100), None),
        (openai.BadRequestError, dict(model="tiny", prompt="x", extra_body={"frobnicate": 1}), None),
        (openai.BadRequestError, dict(model="tiny", prompt="hello " * 2100, max_tokens=5), "context_length_exceeded"),
        (openai.BadRequestError, dict(model="tiny", prompt="x y", max_tokens=2047), "context_length_exceeded"),
    ]
    for error, kwargs, code in cases:
        with pytest.raises(error) as info:
            client.completions.create(**kwargs)
        body = info.value.body
        assert set(body) == {"message", "type", "param", "code"} and body["message"], body
        if code:
            assert body["code"] == code
    status, _, raw = _http("POST", server.url + "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in json.loads(raw)["error"]["message"]
    status, _, raw = _http("GET", server.url + "/v1/nothing")
    assert status == 404 and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    assert server.lines and all(" 400 " in line or " 404 " in line or " 200 " in line for line in server.lines)


def test_api_key_is_required_on_v1_but_not_health_and_cors_only_when_allowed(model, tok, server):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, _, _ = _http("OPTIONS", server.url + "/v1/completions", headers=preflight)
    assert status != 200  # no --allow-origin: browsers get no permission
    srv = start(model, tok, model_name="tiny", api_key="s3cret", allow_origins=["http://localhost:3000"],
                log=lambda _line: None)
    try:
        url = srv.url + "/v1"
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            status, _, raw = _http("GET", url + "/models", headers=headers)
            assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert [m.id for m in ok.models.list().data] == ["tiny"]
        assert _http("GET", srv.url + "/health")[0] == 200
        assert _http("OPTIONS", srv.url + "/v1/completions", headers=preflight)[0] == 200
    finally:
        srv.stop()


def test_bad_requests_do_not_disturb_a_running_stream(server, client, model, tok):
    expected = _greedy(model, tok, PROMPTS[3], 300)
    stream = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=300, temperature=0, stream=True)
    pieces = [next(iter(stream)).choices[0].text]
    for kwargs in (dict(model="tiny", prompt="x", temperature=-1), dict(model="nope", prompt="x"),
                   dict(model="tiny", prompt=[[10**9]])):
        with pytest.raises(openai.APIStatusError):
            client.completions.create(**kwargs)
    pieces += [c.choices[0].text for c in stream]
    assert "".join(pieces) == expected


def test_a_failing_step_fails_its_requests_but_not_the_server(server, client, monkeypatch):
    engine = server.engine
    real = engine._decode_step

    def broken():
        raise RuntimeError("simulated fault")

    monkeypatch.setattr(engine, "_decode_step", broken)
    with pytest.raises(openai.InternalServerError, match="simulated fault"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    monkeypatch.setattr(engine, "_decode_step", real)
    assert wait_idle(engine) and engine.cache.nbytes() == 0
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=5).usage.completion_tokens == 5


def test_client_disconnect_frees_its_rows(server, client):
    assert wait_idle(server.engine)
    before = server.engine.snapshot()
    stream = client.completions.create(model="tiny", prompt="Never", max_tokens=2000, temperature=0, stream=True)
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert wait_idle(server.engine, timeout=5), server.engine.snapshot()
    after = server.engine.snapshot()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 1000  # stopped well before max_tokens
    assert after["cache_bytes"] == 0  # idle: the batch cache is freed ...
    deadline = time.monotonic() + 5
    while server.engine.snapshot()["trims"] == before["trims"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.engine.snapshot()["trims"] > before["trims"]  # ... and handed back to the OS once idle
    # non-streaming requests whose client times out are cancelled too
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="tiny", prompt="Never", max_tokens=2000, temperature=0)
    assert wait_idle(server.engine, timeout=5)
    assert server.engine.snapshot()["cancelled"] == before["cancelled"] + 2


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert json.loads(_http("GET", server.url + "/health")[2])["status"] == "ok"
    stats = json.loads(_http("GET", server.url + "/stats")[2])
    assert stats["max_batch"] == 8 and stats["rss_bytes"] > 0


# -- the command ---------------------------------------------------------------------------------------


def _start_cli(args: list[str], env=None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", *args], stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if match:
            return proc, f"http://127.0.0.1:{match.group(1)}"
    proc.kill()
    raise AssertionError(f"no start-up line; exit {proc.poll()}: {proc.stderr.read()}")


def test_cli_serves_a_model_folder_with_its_own_chat_template(tmp_path, tok):
    tok_with_template = load_tokenizer("gpt2")
    folder = tmp_path / "model"
    saved = tok_with_template.chat_template
    tok_with_template.chat_template = TEMPLATE
    try:
        save_model(_model("llama"), tok_with_template, folder)
    finally:
        tok_with_template.chat_template = saved
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc, url = _start_cli([str(folder), "--port", "0", "--api-key", "k", "--model-name", "m"], env)
    try:
        assert _http("GET", url + "/health")[0] == 200
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      temperature=0)
        assert r.usage.prompt_tokens == len(tok.encode("<user>hi\n<assistant>"))
        assert r.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert re.search(r"POST /v1/chat/completions 200 prompt=\d+ completion=4 tokens in", err), err


def test_cli_refuses_a_busy_port_before_loading(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "pocketlm", "serve", "nowhere", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("pocketlm serve: error: cannot listen on")


@pytest.mark.slow
def test_smollm2_greedy_output_equals_generate():
    prompt = "The capital of France is"
    gen = subprocess.run([sys.executable, "-m", "pocketlm", "generate", "smollm2-135m", "--prompt", prompt,
                          "--temperature", "0", "--max-new-tokens", "40"], capture_output=True, text=True,
                         timeout=600, check=True)
    proc, url = _start_cli(["smollm2-135m", "--port", "0"])
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=40, temperature=0)
        assert r.choices[0].text == gen.stdout.removesuffix("\n")
        chat = c.chat.completions.create(model="smollm2-135m", max_tokens=30, temperature=0,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content  # the GGUF's own chat template (ChatML)
        assert chat.choices[0].finish_reason == "stop"  # ended at <|im_end|>
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
