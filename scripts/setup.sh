#!/usr/bin/env bash
# Sets ampq up in the current Python environment (3.11+): torch first (a CPU build, pinned, when no
# torch is installed; a torch you already have, CUDA or not, is kept), then ampq and its
# dependencies at the versions in constraints.txt (what the tests last passed on; pyproject.toml keeps
# open ranges for library users). `scripts/setup.sh test` adds what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=$(grep -E '^torch==' constraints.txt | cut -d= -f3)
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==$TORCH"
fi
# a torch already installed (a CUDA build, another version) is kept: pin everything else
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
grep -vE '^torch==' constraints.txt >"$pins"
extra=${1:-}
"$PY" -m pip install --quiet -c "$pins" -e ".${extra:+[$extra]}"
"$PY" scripts/lock.py --check || true
# pyenv only sees new console scripts after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
