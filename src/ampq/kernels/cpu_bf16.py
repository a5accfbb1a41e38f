"""CPU kernel for prompts on processors with bf16 matrix instructions (Intel AMX, AVX512-BF16):
the slab kernel's decoding (:mod:`ampq.kernels.cpu_slab`), with each slab of decoded weights and the
activations rounded to bf16 and multiplied there, into a float32 output.

A prompt multiplies every weight by many rows at once, so its time is the matmul's, not the
decoding's; where the processor multiplies bf16 natively, that matmul runs several times faster than
in float32 (benchmarks/bench.py --prompt-tokens 512 measures the prefill). The packed int4/int8 kernels
(:mod:`ampq.kernels.cpu`) already run with bf16 activations; this adds the weights' own rounding to
bf16, about 2^-9 relative, so results stay within the packed kernels' tolerance of the reference
(tests/test_kernels_cpu.py). Without such instructions torch emulates bf16 products, which is
slower than float32, and the slab kernel keeps the prompt. ``AMPQ_CPU_BF16=0`` (or ``1``) overrides
the detection.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from ampq.kernels.cpu_slab import slab_linear

DTYPE = torch.bfloat16
# From how many rows a prompt runs here: below, the packed kernels (which never decode) are as fast
MIN_ROWS = 65
# the CPU flags (Linux /proc/cpuinfo) of instructions that multiply bf16 natively
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def native() -> bool:
    """Whether this processor multiplies bf16 natively (AMPQ_CPU_BF16=0/1 decides instead)."""
    forced = os.environ.get("AMPQ_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # not Linux: no way to tell here without measuring, so float32 as before
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in BF16_FLAGS)


def bf16_linear(layer, x: torch.Tensor) -> torch.Tensor:
    return slab_linear(layer, x, compute=DTYPE)
