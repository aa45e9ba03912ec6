"""`pocketlm serve` under load, through the official openai client (AsyncOpenAI, streaming).

    python benchmarks/bench_serve.py [--source smollm2-135m] [--json OUT]
    python benchmarks/bench_serve.py --tiny --quick          # check the script itself in seconds

Starts `pocketlm serve SOURCE --port 0` in its own process (the command users run, allocator and all),
waits for GET /health, then measures, in this order:
1. TTFT: time to the first streamed token of a 64-token prompt on the idle server (median of
   --ttft-repeats after a warm-up; goal <= 150 ms on smollm2-135m).
2. Batching: aggregate decode tokens/s of 8 concurrent requests vs 1 request alone (--batch-tokens
   new tokens each, `ignore_eos` so every request decodes them all; decode rate = tokens after each
   request's first / time from the first first-token to the last token). Goal: ratio >= 4.
3. Load: --clients concurrent streaming clients x --rounds rounds (64 x 4): every request must complete
   without error; p50/p99 TTFT, aggregate tokens/s; the server's resident memory idle before, at its
   peak, and idle again after (goal: back to the idle level, within 10% or 64 MB).
Exits 1 if a request failed or memory did not come back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a lighthouse", "winter", "a library", "the moon", "a market", "a storm", "a garden"]


def start_server(source: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", source, "--port", "0", *extra],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        print(line.rstrip(), file=sys.stderr)
        match = re.search(r"(http://[\d.]+:\d+)/v1", line)
        if match:
            url = match.group(1)
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                assert r.status == 200
            # keep draining the per-request log lines so the pipe never fills
            asyncio.get_event_loop_policy()  # noqa: B018 - (nothing) keeps import order obvious
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, url
    proc.kill()
    raise SystemExit(f"the server did not start (exit {proc.poll()})")


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=30) as r:
        return json.loads(r.read())


async def stream_one(client, model: str, prompt, max_tokens: int, *, seed: int, ignore_eos: bool = False) -> dict:
    """One streaming completion: TTFT, time of the last token, tokens produced (from the usage chunk)."""
    start = time.perf_counter()
    first = last = None
    usage = None
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=seed, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": ignore_eos})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first if first is not None else now
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None, "no usage chunk"
    first = first if first is not None else time.perf_counter()
    return {"start": start, "first": first, "last": last or first, "ttft": first - start,
            "tokens": usage.completion_tokens}


async def ttft(client, model: str, prompt_ids: list[int], repeats: int) -> dict:
    await stream_one(client, model, prompt_ids, 2, seed=0)  # warm-up
    times = [(await stream_one(client, model, prompt_ids, 1, seed=i))["ttft"] for i in range(repeats)]
    return {"ttft_ms_median": 1000 * statistics.median(times), "ttft_ms_min": 1000 * min(times),
            "prompt_tokens": len(prompt_ids)}


def decode_rate(results: list[dict]) -> float:
    tokens = sum(r["tokens"] - 1 for r in results)
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    return tokens / span if span > 0 else float("nan")


async def batching(client, model: str, tokens: int) -> dict:
    prompt = "Write a short story about {}:"
    alone = [await stream_one(client, model, prompt.format(TOPICS[0]), tokens, seed=1, ignore_eos=True)]
    together = await asyncio.gather(*[stream_one(client, model, prompt.format(TOPICS[i]), tokens, seed=i,
                                                 ignore_eos=True) for i in range(8)])
    one, eight = decode_rate(alone), decode_rate(list(together))
    return {"decode_tokens_per_s_1": one, "decode_tokens_per_s_8": eight, "ratio": eight / one}


async def load(client, model: str, url: str, clients: int, rounds: int, tokens: int) -> dict:
    idle = stats(url)["rss_bytes"]
    peak = [idle]
    done = asyncio.Event()

    async def watch():
        while not done.is_set():
            peak[0] = max(peak[0], await asyncio.to_thread(lambda: stats(url)["rss_bytes"]))
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    results, errors = [], []
    started = time.perf_counter()
    for r in range(rounds):
        outcomes = await asyncio.gather(*[
            stream_one(client, model, f"Describe {TOPICS[i % len(TOPICS)]} in a few lines. ({r}.{i})", tokens,
                       seed=r * clients + i) for i in range(clients)], return_exceptions=True)
        for o in outcomes:
            (errors if isinstance(o, BaseException) else results).append(o)
    wall = time.perf_counter() - started
    done.set()
    await watcher
    deadline = time.monotonic() + 30
    after = stats(url)
    while (after["running"] or after["waiting"]) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        after = stats(url)
    await asyncio.sleep(2)  # let the engine hand its cache back
    after = stats(url)
    ttfts = sorted(r["ttft"] for r in results)
    back = after["rss_bytes"] <= max(idle * 1.10, idle + (64 << 20))
    return {"requests": clients * rounds, "completed": len(results), "errors": [repr(e) for e in errors[:5]],
            "ttft_ms_p50": 1000 * ttfts[len(ttfts) // 2] if ttfts else None,
            "ttft_ms_p99": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "rss_idle_mb": idle / 2**20, "rss_peak_mb": peak[0] / 2**20, "rss_after_mb": after["rss_bytes"] / 2**20,
            "memory_back_to_idle": back, "server_max_rows": after["max_rows"]}


def tiny_source(folder: Path) -> str:
    import torch

    from pocketlm.io import save_model
    from pocketlm.model import GPT
    from pocketlm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    save_model(GPT.from_name("gpt2-tiny"), load_tokenizer("gpt2"), folder / "gpt2-tiny")
    return str(folder / "gpt2-tiny")


async def run(args, url: str, model: str, tokenizer) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "unused", max_retries=0,
                                timeout=600)
    text = " ".join(["The old harbour town wakes slowly under a grey sky."] * 20)
    prompt_ids = tokenizer.encode(text)[:64]
    out = {"source": args.source, "ttft": await ttft(client, model, prompt_ids, args.ttft_repeats)}
    print(f"TTFT, 64-token prompt, idle server: {out['ttft']['ttft_ms_median']:.0f} ms median "
          f"(goal <= 150 ms on smollm2-135m)", flush=True)
    out["batching"] = await batching(client, model, args.batch_tokens)
    b = out["batching"]
    print(f"decode tokens/s: 1 alone {b['decode_tokens_per_s_1']:.1f}, 8 concurrent {b['decode_tokens_per_s_8']:.1f}"
          f" -> {b['ratio']:.2f}x (goal >= 4x)", flush=True)
    out["load"] = await load(client, model, url, args.clients, args.rounds, args.load_tokens)
    ld = out["load"]
    print(f"load {args.clients} clients x {args.rounds} rounds: {ld['completed']}/{ld['requests']} completed, "
          f"{len(ld['errors'])} errors; TTFT p50 {ld['ttft_ms_p50']:.0f} ms, p99 {ld['ttft_ms_p99']:.0f} ms; "
          f"{ld['tokens_per_s']:.1f} tokens/s aggregate; RSS idle {ld['rss_idle_mb']:.0f} MB, peak "
          f"{ld['rss_peak_mb']:.0f} MB, after {ld['rss_after_mb']:.0f} MB "
          f"({'back to idle' if ld['memory_back_to_idle'] else 'NOT back to idle'})", flush=True)
    await client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--tiny", action="store_true", help="serve a random gpt2-tiny instead (script check)")
    parser.add_argument("--quick", action="store_true", help="8 clients x 2 rounds, short outputs")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--load-tokens", type=int, default=64, help="max_tokens per load-test request")
    parser.add_argument("--batch-tokens", type=int, default=128)
    parser.add_argument("--ttft-repeats", type=int, default=10)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--server-args", default="", help="extra `pocketlm serve` flags, e.g. '--max-batch 32'")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds, args.load_tokens, args.batch_tokens, args.ttft_repeats = 8, 2, 16, 32, 3
    sys.path.insert(0, str(ROOT))
    from pocketlm.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.source = tiny_source(Path(tmp))
        extra = args.server_args.split() + (["--api-key", args.api_key] if args.api_key else [])
        proc, url = start_server(args.source, extra)
        try:
            model = json.loads(urllib.request.urlopen(url + "/health").read())["model"]
            tokenizer = load_tokenizer(args.source)
            out = asyncio.run(run(args, url, model, tokenizer))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    ok = not out["load"]["errors"] and out["load"]["completed"] == out["load"]["requests"] \
        and out["load"]["memory_back_to_idle"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
