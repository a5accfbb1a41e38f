#!/usr/bin/env bash
# Builds benchmarks/.venv-peers: a virtual environment apart from the project's own, holding the
# peer quantization libraries (llm-compressor, bitsandbytes, hqq, optimum-quanto) next to ampq, so
# run_peer.py can quantize with a peer and evaluate with ampq on the same tokens.
#
#     bash benchmarks/peers/setup.sh                # create or complete the venv, verify, write versions.txt
#     benchmarks/.venv-peers/bin/python benchmarks/peers/run_peer.py --help
#
# torch==2.13.0 goes in first and every later pip command carries constraints.txt, so no peer can
# pull another torch. llm-compressor 0.14 pins its own transformers (5.17), which is why this is a
# separate venv: the project's environment keeps its own transformers.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${PEERS_VENV:-$REPO/benchmarks/.venv-peers}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$HERE/constraints.txt"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }

echo "== torch (first, pinned)" >&2
pip_install "torch==2.13.0"

echo "== peers" >&2
pip_install "torch==2.13.0" \
    "llmcompressor==0.14.*" \
    "bitsandbytes==0.50.2" \
    "hqq" \
    "optimum-quanto"

echo "== ampq (editable, no deps) and its light deps" >&2
pip_install "torch==2.13.0" safetensors gguf accelerate tqdm rich numpy
pip_install --no-deps -e "$REPO"

echo "== verify" >&2
"$VPY" - <<'PY'
import importlib, sys
mods = ["torch", "transformers", "llmcompressor", "compressed_tensors", "datasets", "bitsandbytes",
        "hqq", "hqq.core.quantize", "optimum.quanto", "ampq", "ampq.evaluation", "ampq.data"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
        print(f"ok   {m}")
    except Exception as e:  # report every failure, then fail once
        bad.append(m)
        print(f"FAIL {m}: {type(e).__name__}: {e}")
import torch
if torch.__version__.split("+")[0] != "2.13.0":
    bad.append(f"torch is {torch.__version__}, not 2.13.0")
    print(f"FAIL torch is {torch.__version__}, not 2.13.0")
sys.exit(1 if bad else 0)
PY

echo "== versions -> $HERE/versions.txt" >&2
{
    echo "# written by benchmarks/peers/setup.sh on $(date -u +%Y-%m-%dT%H:%MZ); python $("$VPY" -c 'import platform; print(platform.python_version())')"
    "$VPY" - <<'PY'
from importlib.metadata import version
for d in ["torch", "transformers", "llmcompressor", "compressed-tensors", "datasets", "accelerate",
          "bitsandbytes", "hqq", "optimum-quanto", "safetensors", "numpy", "ampq"]:
    print(f"{d}=={version(d)}")
PY
    echo "# full environment (pip freeze)"
    "$VPY" -m pip freeze --disable-pip-version-check --exclude-editable
} > "$HERE/versions.txt"
cat "$HERE/versions.txt" | sed -n '1,14p' >&2
echo "done: $VPY" >&2
