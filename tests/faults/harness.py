"""The fault-injection harness: run a command (in this process, or as a real process that can be killed),
corrupt a file the way a crash or a user does, and check the promises.

Promises checked: a user error exits 2 with `pocketlm COMMAND: error: ...` as the last stderr line and no
traceback; what was valid before the fault is byte-for-byte unchanged after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def last_err_line(self) -> str:
        lines = [line for line in self.err.replace("\r", "\n").splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_inprocess(argv: list[str], capsys=None) -> Result:
    """The CLI's main() here: fast; an uncaught exception (a traceback) fails the test by itself.
    Without capsys (in fixtures wider than one test), output is captured by redirecting sys.stdout/err."""
    import contextlib
    import io

    from pocketlm.cli import main
    from pocketlm.io import builtins

    builtins.clear_cache()  # a file corrupted since the last call must be read again
    out, err = io.StringIO(), io.StringIO()
    if capsys is not None:
        capsys.readouterr()
    redirect = contextlib.nullcontext() if capsys is not None else contextlib.ExitStack()
    if capsys is None:
        redirect.enter_context(contextlib.redirect_stdout(out))
        redirect.enter_context(contextlib.redirect_stderr(err))
    with redirect:
        try:
            main([str(a) for a in argv])
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if capsys is not None:
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)
    return Result(rc, out.getvalue(), err.getvalue())


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["POCKETLM_ALLOCATOR"] = "glibc"  # no re-exec: the pid we signal is the process that works
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def cli_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "pocketlm", *[str(a) for a in argv]]


def default_ctrl_c() -> None:
    """In the child before exec: Ctrl-C as in a terminal. A test run started in the background of a
    non-interactive shell inherits SIGINT *ignored*, and Python keeps an ignored SIGINT ignored: every
    SIGINT case would then pass without being tried."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_process(argv: list[str], timeout: float = 300, prefix: list[str] | None = None) -> Result:
    p = subprocess.run([*(prefix or []), *cli_command(argv)], capture_output=True, text=True, env=env(),
                       timeout=timeout, cwd=REPO, preexec_fn=default_ctrl_c)
    return Result(p.returncode, p.stdout, p.stderr)


def run_and_signal(argv: list[str], sig: int, after: float, timeout: float = 300) -> Result:
    """Start the command, send `sig` after `after` seconds (if it still runs), wait for it."""
    p = subprocess.Popen(cli_command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                         cwd=REPO, preexec_fn=default_ctrl_c)
    deadline = time.monotonic() + after
    while time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    if p.poll() is None:
        p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return Result(p.returncode, out, err)


def assert_user_error(result: Result, command: str, *fragments: str) -> None:
    assert "Traceback" not in result.err, result.err
    assert result.rc == 2, (result.rc, result.err[-2000:])
    assert result.last_err_line.startswith(f"pocketlm {command}: error:"), result.err[-2000:]
    for fragment in fragments:
        assert fragment in result.last_err_line, (fragment, result.last_err_line)


def assert_ok(result: Result) -> None:
    assert result.rc == 0 and "Traceback" not in result.err, (result.rc, result.err[-3000:])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden temporaries excluded) -> sha256: what 'unchanged' compares."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            found[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (`.NAME.*.tmp`, `.NAME.old`) under folder."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*")
                  if p.name.endswith((".tmp", ".old")))


# -- corruptions: each is what a crash, a full disk or a user leaves behind ----------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, len(data) // 2)])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(max(64, min(path.stat().st_size, 4096))))


def wrong_json_shape(path: Path) -> None:
    path.write_text(json.dumps(["not", "an", "object"]))


def missing(path: Path) -> None:
    path.unlink()


def odd_length(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\x01")


CORRUPTIONS = {"truncate": truncate, "empty": empty, "garbage": garbage, "wrong_json_shape": wrong_json_shape,
               "missing": missing}
BINARY_CORRUPTIONS = {"truncate": truncate, "empty": empty, "garbage": garbage, "missing": missing}


def can_mount() -> bool:
    """Root with private mount namespaces (unshare -m): tmpfs disks that fill up, read-only mounts."""
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_small_disk(folder: Path, size: str, argv: list[str], read_only: bool = False,
                  seed_from: Path | None = None, timeout: float = 300) -> Result:
    """Run the command with `folder` a fresh tmpfs of `size` (copied from seed_from first; read-only if asked),
    in a private mount namespace: the machine's disks are never touched or filled."""
    folder.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o size={size} tmpfs {folder} && "
    if seed_from is not None:
        script += f"cp -a {seed_from}/. {folder}/ && "
    if read_only:
        script += f"mount -o remount,ro {folder} && "
    script += " ".join(f"'{a}'" for a in cli_command(argv))
    script += f"; rc=$?; tar -C {folder} -cf {folder}.after.tar . ; exit $rc"
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env(),
                       timeout=timeout, cwd=REPO)
    return Result(p.returncode, p.stdout, p.stderr)


SIGNALS = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}
