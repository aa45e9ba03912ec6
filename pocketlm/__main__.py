"""`python -m pocketlm` and the `pocketlm` command: the CLI with Ctrl-C handled at every moment.

Ctrl-C ends any command with one line, `pocketlm CMD: interrupted`, and exit status 130 -- also while the
command is still importing, and while the interpreter shuts down after the command has finished (where
Python would otherwise die of the signal itself, exit status -2, whatever the command returned).
"""

import signal
import sys


def _stop_listening() -> None:
    """The command has finished or given up: a late Ctrl-C must not change how it ends. (Python resets
    its own handler to the default at shutdown, but leaves an ignored signal ignored.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupted() -> None:
    _stop_listening()
    name = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    print(f"pocketlm{' ' + name if name else ''}: interrupted", file=sys.stderr)
    sys.exit(130)


def run() -> None:
    """The console script's entry point (and `python -m pocketlm`'s)."""
    if hasattr(signal, "pthread_sigmask"):
        # Hold Ctrl-C back while modules import; pocketlm.cli.main lets it through once its handlers are in
        # place. One landing inside an import is worse than a traceback: inside torch's C++ start-up it aborts
        # (exit -6), and inside code Python runs with exec (dataclasses, namedtuple) it makes the interpreter
        # exit -2 whatever the handler then says. (Across the allocator restart it stays held: the mask and a
        # pending signal survive exec.)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        from pocketlm.cli import main
    except KeyboardInterrupt:  # where signals cannot be held back
        _interrupted()
    try:
        main()
    except KeyboardInterrupt:  # between the command's own handler and here
        _interrupted()
    finally:
        _stop_listening()


if __name__ == "__main__":
    run()
