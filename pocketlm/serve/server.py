"""Start the server: load a model, start the engine, run uvicorn on a socket bound here.

`serve(SOURCE, ...)` is what `pocketlm serve` runs (blocks until Ctrl-C); `start(model, tokenizer, ...)`
runs the same server in a background thread and returns its address (tests, notebooks, benchmarks).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pocketlm.device import check_inference_precision
from pocketlm.errors import UserError
from pocketlm.serve.engine import Engine


def load(source: str, adapter: str | Path | None = None, device: str = "auto", precision: str = "auto"):
    """(model, tokenizer, device) for any source `pocketlm generate` accepts, with an optional LoRA adapter,
    its float weights in `precision` (auto: bf16 where the hardware runs it natively, else fp32)."""
    from pocketlm.device import pick_device

    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"--adapter {adapter} is not a folder: give the adapter folder a LoRA run saved")
    dev = pick_device(device)
    check_inference_precision(precision)
    from pocketlm.io import load_model

    model, tokenizer = load_model(source, adapter=adapter, device=dev, precision=precision)
    return model.eval(), tokenizer, dev


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: a free one), or a UserError that says what to do."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port: give one from 1 to 65535 (0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port, or stop the "
                        "process using it") from exc
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, on_ready: Callable[[], None] | None):
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            timeout_keep_alive=30)
    return Server(config)


def _describe(model, device, name: str) -> str:
    p = next(model.parameters())
    params = model.num_parameters() / 1e6
    return f"{name} ({params:.1f}M parameters) on {device}, {str(p.dtype).removeprefix('torch.')}"


def serve(source: str, *, adapter: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, chat_template: str | Path | None = None,
          max_batch: int = 64, prefill_chunk: int = 128, default_chat_tokens: int = 512, device: str = "auto",
          precision: str = "auto", allow_origins: list[str] | None = None, log: Callable[[str], None] | None = None) -> None:
    """Serve SOURCE with OpenAI's API on host:port until interrupted."""
    from pocketlm.serve import chat
    from pocketlm.serve.app import create_app

    log = log or (lambda line: print(f"pocketlm serve: {line}", file=sys.stderr, flush=True))
    if max_batch < 1 or prefill_chunk < 1:
        raise UserError("--max-batch and --prefill-chunk must be at least 1")
    check_inference_precision(precision)
    template = chat.read_template(chat_template) if chat_template is not None else None
    sock = bind(host, port)  # before loading: a busy port fails in a second, not after the model loads
    log(f"loading {source}{f' with adapter {adapter}' if adapter else ''} ...")
    started = time.perf_counter()
    model, tokenizer, dev = load(source, adapter, device, precision)
    log(f"loaded in {time.perf_counter() - started:.1f}s")
    name = model_name or _default_name(source)
    engine = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk).start()
    app = create_app(engine, name, api_key=api_key, chat_template=template,
                     default_chat_tokens=default_chat_tokens, allow_origins=allow_origins, log=log)
    bound_host, bound_port = sock.getsockname()[:2]
    has_template = template is not None or getattr(tokenizer, "chat_template", None) is not None

    def ready() -> None:
        warning = "" if host in ("127.0.0.1", "localhost", "::1") or api_key else \
            " WARNING: listening beyond this machine without --api-key"
        log(f"{_describe(model, dev, name)}, max batch {max_batch}, chat template "
            f"{'yes' if has_template else 'none (completions only; --chat-template FILE)'}; "
            f"http://{bound_host}:{bound_port}/v1{' (API key required)' if api_key else ''}{warning}")

    server = _uvicorn_server(app, ready)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn has shut down gracefully, then re-raised Ctrl-C / SIGTERM
        pass
    finally:
        log("stopped")
        engine.stop()
        sock.close()


def _default_name(source: str) -> str:
    path = Path(str(source))
    return path.name if path.exists() else str(source)


@dataclass
class RunningServer:
    url: str  # http://host:port (the openai client's base_url is url + "/v1")
    engine: Engine
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()


def start(model, tokenizer, *, model_name: str = "pocketlm", host: str = "127.0.0.1", port: int = 0,
          api_key: str | None = None, chat_template: str | None = None, max_batch: int = 64,
          prefill_chunk: int = 128, default_chat_tokens: int = 512, allow_origins: list[str] | None = None,
          log: Callable[[str], None] | None = None) -> RunningServer:
    """Serve an already loaded model from a background thread; returns once it answers."""
    from pocketlm.serve.app import create_app

    engine = Engine(model.eval(), tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk).start()
    app = create_app(engine, model_name, api_key=api_key, chat_template=chat_template,
                     default_chat_tokens=default_chat_tokens, allow_origins=allow_origins, log=log)
    sock = bind(host, port)
    ready = threading.Event()
    server = _uvicorn_server(app, ready.set)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pocketlm-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not ready.wait(0.05):
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.stop()
            raise RuntimeError("the server did not start")
    bound_host, bound_port = sock.getsockname()[:2]
    return RunningServer(f"http://{bound_host}:{bound_port}", engine, server, thread)
