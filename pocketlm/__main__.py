import sys

try:
    from pocketlm.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command is still importing: one line, like any interruption
    name = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else ""
    print(f"pocketlm{' ' + name if name else ''}: interrupted", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    main()
