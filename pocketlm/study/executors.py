"""Where cells run. `local` (the default): one after another, each in a fresh worker process forked from
a server that imported torch once (so a cell's peak memory is its own and a crash fails only that cell).
`ray`: each cell a Ray task with its own CPUs/GPUs on a Ray cluster (or a local Ray instance); run
directories must then live on storage every node sees. Both run the same `cell.run_cell`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pocketlm.errors import UserError

OnResult = Callable[[dict, dict], None]  # (payload, row)


def cell_in_this_process(payload: dict) -> dict:
    """Run a cell here with its output appended to DIR/CELL/cell.log; its row."""
    from pocketlm.study.cell import run_cell

    if payload.get("threads"):
        import torch

        torch.set_num_threads(int(payload["threads"]))
    log = Path(payload["study_dir"]) / payload["cell"]["id"] / "cell.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return run_cell(payload)


def _child(payload: dict, conn, parent_pid: int) -> None:
    from pocketlm.study.cell import _watch_parent

    _watch_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the study, which ends us
    row = cell_in_this_process(payload)
    conn.send(row)
    conn.close()


def _noop() -> None:
    pass


def _dead_row(payload: dict, exitcode: int | None) -> dict:
    cell = payload["cell"]
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = f"its process was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        why = f"its process exited with code {exitcode} before reporting"
    return {"cell": cell["id"], "status": "failed", "knobs": cell["varied"], "repeat": cell["repeat"],
            "seed": cell["seed"], "method": cell["knobs"]["method"], "run_dir": cell["id"],
            "error": f"{why}; see {cell['id']}/cell.log"}


class LocalExecutor:
    name = "local"

    def __init__(self) -> None:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self.ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            # Everything a cell imports, imported once: a cell's process then starts in milliseconds.
            self.ctx.set_forkserver_preload(["torch", "pocketlm.study.cell", "pocketlm.study.measure_run",
                                             "pocketlm.train", "pocketlm.finetune", "pocketlm.lora",
                                             "pocketlm.data.prepare", "pocketlm.generate",
                                             "pocketlm.eval.likelihood", "pocketlm.eval.generation_eval",
                                             "pocketlm.eval.multiple_choice", "pocketlm.io.sources"])
            # Torch imports once, here (a no-op worker waits for the server's imports), not in a cell's time.
            warm = self.ctx.Process(target=_noop)
            warm.start()
            warm.join()

    def execute(self, payloads: list[dict], on_result: OnResult, on_start: Callable[[dict], None]) -> None:
        for payload in payloads:
            on_start(payload)
            on_result(payload, self.run_one(payload))

    def run_one(self, payload: dict) -> dict:
        parent_conn, child_conn = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=_child, args=(payload, child_conn, os.getpid()), daemon=False)
        process.start()
        child_conn.close()
        row = None
        try:
            while row is None and (process.is_alive() or parent_conn.poll()):
                if parent_conn.poll(0.5):
                    try:
                        row = parent_conn.recv()
                    except EOFError:
                        break
            process.join()
        except BaseException:  # Ctrl-C or an error here: the cell's worker must not outlive the study
            process.terminate()
            process.join(10)
            if process.is_alive():
                process.kill()
            raise
        return row if row is not None else _dead_row(payload, process.exitcode)


class RayExecutor:
    """Each cell a Ray task (`max_calls=1`: a fresh worker per cell, as the local executor); cells that
    start from another cell are submitted when it has finished."""

    name = "ray"

    def __init__(self, address: str | None, cpus_per_cell: float, gpus_per_cell: float,
                 num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise UserError("--executor ray needs Ray: pip install 'pocketlm[ray]'") from exc
        self.ray = ray
        if not ray.is_initialized():
            kwargs = {"address": address} if address else {"num_cpus": num_cpus}
            pythonpath = os.environ.get("PYTHONPATH")
            env = {"env_vars": {"PYTHONPATH": pythonpath}} if pythonpath else None
            try:
                ray.init(**kwargs, include_dashboard=False, log_to_driver=False, runtime_env=env,
                         ignore_reinit_error=True)
            except ConnectionError as exc:
                raise UserError(f"cannot reach the Ray cluster at {address}: {exc} (start it with `ray start "
                                "--head`, or omit --address for a local instance)") from exc
        self.task = ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_calls=1,
                               max_retries=0)(cell_in_this_process)

    def execute(self, payloads: list[dict], on_result: OnResult, on_start: Callable[[dict], None]) -> None:
        ray = self.ray
        waiting = list(payloads)
        running: dict = {}
        finished: set[str] = set()
        todo_ids = {p["cell"]["id"] for p in payloads}
        try:
            while waiting or running:
                for payload in list(waiting):
                    deps = [d for d in payload["cell"]["depends"] if d in todo_ids]
                    if all(d in finished for d in deps):
                        on_start(payload)
                        running[self.task.remote(payload)] = payload
                        waiting.remove(payload)
                if not running:
                    raise RuntimeError("cells wait on each other")  # ruled out when the grid was built
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    payload = running.pop(ref)
                    try:
                        row = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the worker died: a failed cell
                        row = _dead_row(payload, None)
                        row["error"] = f"the Ray task failed: {str(exc).splitlines()[0]}"
                    finished.add(payload["cell"]["id"])
                    on_result(payload, row)
        finally:
            for ref in running:
                ray.cancel(ref, force=True)


def make_executor(name: str, *, address: str | None = None, cpus_per_cell: float = 1,
                  gpus_per_cell: float = 0, num_cpus: int | None = None):
    if name == "local":
        if address:
            raise UserError("--address is for --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, cpus_per_cell, gpus_per_cell, num_cpus)
    raise UserError(f"unknown executor {name!r}: choose local or ray")
