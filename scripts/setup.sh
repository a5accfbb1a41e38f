#!/usr/bin/env bash
# Sets ampq up in the current Python environment (3.11+): torch first (a CPU build, pinned, when no
# torch is installed; a torch you already have, CUDA or not, is kept), then ampq and its
# dependencies. `scripts/setup.sh test` adds what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
extra=${1:-}
"$PY" -m pip install --quiet -e ".${extra:+[$extra]}"
# pyenv only sees new console scripts after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
