"""The `pocketlm` command line: one module per subcommand, each with `register(subparsers)`.

Every subcommand module defines `register(subparsers)`, which adds its parser and sets
`func=run` on it. User mistakes raise `UserError`; main() prints them on one line and exits 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys

from pocketlm.errors import UserError
from pocketlm.memory import reexec_with_tcmalloc, tune_allocator

# Order is the order of `pocketlm --help`.
COMMAND_MODULES = [
    "demo",
    "models",
    "prepare",
    "pretrain",
    "finetune",
    "generate",
    "eval",
    "export",
    "merge",
    "serve",
    "synth",
    "quantize",
    "study",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm",
        description="Build, adapt, compress, evaluate and compare small GPT-style language models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pocketlm.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pocketlm.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(subparsers)
    return parser


# Every command but the listing loads or runs models: worth a faster allocator (see pocketlm/memory.py).
_HEAVY_COMMANDS = set(COMMAND_MODULES) - {"models"}


_OS_ADVICE = {
    errno.ENOSPC: "free some space, or write to another disk",
    errno.EDQUOT: "free some space, or write to another disk",
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.EISDIR: "that is a folder: give a file path",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EEXIST: "it already exists: choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def os_error_message(exc: OSError) -> str:
    """`cannot access PATH: <reason>: <what to do>` for an OSError that reached the command line."""
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:  # a rename: the destination is the path the user named
        where = exc.filename2
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = _OS_ADVICE.get(exc.errno, "check the path and the disk")
    return f"cannot access {where}: {reason}: {advice}"


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def _close_progress_bars() -> None:
    """Close bars an error left open now, so that they print before the error line, not after it."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def _fail(command: str, message: str, status: int = 2) -> None:
    _close_progress_bars()
    sys.stdout.flush()
    print(f"pocketlm {command}: {message}" if command else f"pocketlm: {message}", file=sys.stderr)
    sys.exit(status)


def release_ctrl_c() -> None:
    """Let Ctrl-C through: pocketlm.__main__ holds it back while modules import (see there), and one pressed
    meanwhile arrives here, as a KeyboardInterrupt the caller turns into `pocketlm CMD: interrupted`."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in _HEAVY_COMMANDS:
        try:  # from a shell: restart once with tcmalloc preloaded where installed (POCKETLM_ALLOCATOR)
            reexec_with_tcmalloc(sys.argv[1:])
        except UserError as exc:
            print(f"pocketlm: error: {exc}", file=sys.stderr)
            sys.exit(2)
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up: no traceback either
        command = next(iter(argv if argv is not None else sys.argv[1:]), "")
        _fail(command if command in COMMAND_MODULES else "", "interrupted", 130)
    if unknown:  # said by the subcommand's parser, so the line names the command: `pocketlm CMD: error:`
        sub = _subparser(parser, getattr(args, "command", None))
        (sub or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    try:
        tune_allocator()  # reuse freed memory instead of page-faulting it back each step (POCKETLM_ALLOCATOR)
        if args.command in _HEAVY_COMMANDS:  # every one imports torch: now, while Ctrl-C is held back
            import torch  # noqa: F401
        release_ctrl_c()
        args.func(args)
    except UserError as exc:
        _fail(args.command, f"error: {exc}")
    except BrokenPipeError:  # e.g. `pocketlm models | head`: the reader left, nothing is wrong
        sys.stderr.close()
        sys.exit(0)
    except OSError as exc:  # the operating system refused a read or write: one line, like a user error
        _fail(args.command, f"error: {os_error_message(exc)}")
    except KeyboardInterrupt:
        _fail(args.command, "interrupted", 130)
