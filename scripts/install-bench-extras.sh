#!/usr/bin/env bash
# Peer libraries for `persona-axis bench steer`, installed without their dependency pins
# (steering-vectors asks for transformers<5 and repeng for numpy<2; both run with ours).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip install --quiet --no-deps steering-vectors==0.12.2 repeng==0.4.0
