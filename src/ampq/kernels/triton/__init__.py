"""GPU kernels written in Triton: a quantized matmul that decodes 4- and 8-bit codes as it goes.

Triton is optional (extra ``gpu``; CI installs it to run these kernels in its interpreter,
``TRITON_INTERPRET=1``, on the CPU). Without it, or for formats these kernels do not cover, the
reference kernel runs.
"""

from __future__ import annotations

import importlib.util


def available() -> bool:
    return importlib.util.find_spec("triton") is not None
