"""The Triton kernel against the reference kernel, in Triton's interpreter on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_lut_gemm_matches_the_reference_for_every_covered_format():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("_triton_check.py"))], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-3000:] + r.stderr[-3000:]


def test_tuning_never_picks_split_k_atomics_for_bf16_or_past_the_layer():
    import torch

    from ampq.kernels.triton.lut_gemm import _TUNED, _prune

    for name, tuner in _TUNED.items():
        for k, width, dtype in [(32, 32, torch.bfloat16), (4096, 128, torch.bfloat16), (4096, 128, torch.float16),
                                (130, 130, torch.float16)]:
            kept = _prune(tuner.configs, {"K": k, "width": width, "y_ptr": torch.empty(1, dtype=dtype)})
            assert kept, (name, k)
            for c in kept:
                assert c.kwargs["SPLIT_K"] <= max(1, -(-k // c.kwargs["BK"])), (name, k, c)
                assert dtype != torch.bfloat16 or c.kwargs["SPLIT_K"] == 1, (name, k, c)
                assert c.kwargs["TILE_SCALE"] is False or width % c.kwargs["BK"] == 0, (name, width, c)
