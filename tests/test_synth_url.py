"""The URL teacher through the official `openai` client: retries, 4xx, unreachable server, concurrency.

The server here is a small FastAPI/uvicorn stand-in whose failures the test controls (503s, a 400), so
the client's behaviour is tested exactly; the end-to-end test against `pocketlm serve` is in
test_synth_recipe.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from pocketlm.cli import main
from pocketlm.errors import UserError
from pocketlm.synth import FilterSettings, Sampling, SynthOptions, synthesize

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


class StandIn:
    """A completions endpoint that writes greentext, sleeps a little, and fails as told."""

    def __init__(self) -> None:
        self.fail_next: list[int] = []  # status codes to answer the next requests with
        self.always: int | None = None
        self.inflight = 0
        self.max_inflight = 0
        self.requests = 0
        app = fastapi.FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "stand-in", "object": "model", "owned_by": "test"}]}

        @app.post("/v1/completions")
        async def completions(body: dict):
            self.requests += 1
            if self.always or self.fail_next:
                code = self.always or self.fail_next.pop(0)
                return fastapi.responses.JSONResponse(
                    {"error": {"message": f"stand-in says {code}", "type": "x", "param": None, "code": None}},
                    status_code=code)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            await asyncio.sleep(0.05)
            self.inflight -= 1
            text = f">be me\n>sample seed {body['seed']}\n>prompt {body['prompt'][:20]}"
            return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}}

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    stand_in = StandIn()
    stand_in.thread.start()
    deadline = time.monotonic() + 20
    while not stand_in.server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield stand_in
    stand_in.server.should_exit = True
    stand_in.thread.join(timeout=10)


def opts(url, prompts, out, samples, **kw) -> SynthOptions:
    return SynthOptions(teacher=url, prompts=str(prompts), out=str(out), samples=samples,
                        sampling=Sampling(max_new_tokens=16), progress=False, **kw)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a\nb\nc\n")
    return path


def test_concurrency_keeps_k_requests_in_flight(server, prompts, tmp_path):
    report = synthesize(opts(server.url, prompts, tmp_path / "one.jsonl", 6, concurrency=1))
    assert server.max_inflight == 1 and report["teacher_model"] == "stand-in"
    server.max_inflight = 0
    report = synthesize(opts(server.url, prompts, tmp_path / "four.jsonl", 16, concurrency=4,
                             filters=FilterSettings(validate="greentext", dedupe="exact")))
    assert server.max_inflight == 4
    records = [json.loads(line) for line in (tmp_path / "four.jsonl").read_text().splitlines()]
    assert len(records) == 16 and len({r["id"] for r in records}) == 16 and all(r["kept"] for r in records)
    assert report["this_run"]["completion_tokens"] == 16 * 7
    assert {r["seed"] for r in records} == set(range(16))


def test_5xx_is_retried_with_backoff(server, prompts, tmp_path):
    server.fail_next = [503, 500]
    report = synthesize(opts(server.url, prompts, tmp_path / "out.jsonl", 2, retries=3))
    assert report["records"] == 2 and server.requests == 4


def test_4xx_unreachable_and_exhausted_retries_are_one_line_errors(server, prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    synthesize(opts(server.url, prompts, out, 3))
    before = out.read_text()
    server.always = 400
    with pytest.raises(UserError, match=r"refused a request with HTTP 400 \(stand-in says 400\)"):
        synthesize(opts(server.url, prompts, out, 6))
    server.always = 503
    with pytest.raises(UserError, match="kept answering HTTP 503"):
        synthesize(opts(server.url, prompts, out, 6, retries=1))
    closed = f"http://127.0.0.1:{free_port()}"
    args = ["synth", "--teacher", closed, "--prompts", str(prompts), "--samples", "6", "--out", str(out),
            "--max-new-tokens", "16", "--retries", "0", "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pocketlm synth: error: cannot reach the teacher at") and "--teacher" in last
    assert out.read_text() == before  # nothing written before a failure is lost
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["records"] == 3 and report["this_run"]["generated"] == 0


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    template = tmp_path / "t.yaml"
    template.write_text("template: 'about {topic}'\n")
    base = ["synth", "--teacher", "http://127.0.0.1:9", "--samples", "2", "--out", str(tmp_path / "o.jsonl")]
    cases = [(["--prompts", str(prompts), "--validate", "haiku"], "unknown form 'haiku'"),
             (["--prompts", str(template)], "unknown variable {topic}"),
             (["--prompts", str(tmp_path / "missing.txt")], "does not exist"),
             (["--prompts", str(prompts), "--concurrency", "0"], "--concurrency must be at least 1")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("pocketlm synth: error: ") and message in err[-1], err
        assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o.jsonl").exists()  # validated before anything is written


@pytest.fixture(scope="module")
def pocketlm_server():
    """`pocketlm serve` in process (pocketlm.serve.start) on a tiny model with a ChatML template and a key."""
    import torch

    from pocketlm.model import GPT
    from pocketlm.serve import start
    from pocketlm.serve.chat import CHATML
    from pocketlm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    srv = start(GPT.from_name("gpt2-tiny").eval(), load_tokenizer("gpt2"), model_name="tiny", chat_template=CHATML,
                api_key="sekret", max_batch=8, log=lambda line: None)
    yield srv
    srv.stop()


def test_against_pocketlm_serve_chat_usage_and_api_key(pocketlm_server, prompts, tmp_path, monkeypatch):
    monkeypatch.delenv("POCKETLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match=r"HTTP 401 .*pass --api-key"):
        synthesize(opts(pocketlm_server.url, prompts, out, 2))
    report = synthesize(SynthOptions(teacher=pocketlm_server.url + "/v1", prompts=str(prompts), out=str(out),
                                     samples=6, sampling=Sampling(max_new_tokens=8, chat=True), api_key="sekret",
                                     concurrency=3, progress=False))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["teacher_model"] == "tiny" and len(records) == 6
    assert all(r["sampling"]["chat"] and 1 <= r["completion_tokens"] <= 8 for r in records)
    assert report["this_run"]["completion_tokens"] == sum(r["completion_tokens"] for r in records)
    # The server honours seeds: the same command into another file gives the same texts.
    again = tmp_path / "again.jsonl"
    synthesize(SynthOptions(teacher=pocketlm_server.url, prompts=str(prompts), out=str(again), samples=6,
                            sampling=Sampling(max_new_tokens=8, chat=True), api_key="sekret", progress=False))
    by_id = {r["id"]: r["text"] for r in map(json.loads, again.read_text().splitlines())}
    assert by_id == {r["id"]: r["text"] for r in records}


def test_samples_per_prompt(server, prompts, tmp_path):
    report = synthesize(opts(server.url, prompts, tmp_path / "out.jsonl", 2, per_prompt=True, concurrency=2))
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert report["requested"] == 6 and sorted(r["prompt"] for r in records) == ["a", "a", "b", "b", "c", "c"]
