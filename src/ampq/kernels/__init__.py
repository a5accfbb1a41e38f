"""Quantized matmul kernels, chosen per format, device and batch.

The reference kernel (decode, then matmul) is always available and is the ground truth that every
faster kernel is tested against.
"""

from __future__ import annotations

import torch

from ampq.kernels.reference import reference_linear


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    return reference_linear(layer, x)
