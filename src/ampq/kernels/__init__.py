"""Quantized matmul kernels, chosen per format, device and batch.

The reference kernel (decode, then matmul) is always available and is the ground truth that every
faster kernel is tested against.
"""

from __future__ import annotations

import torch

from ampq.kernels.reference import reference_linear


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.input_scale is not None:
        x = x / layer.input_scale.to(x.dtype)
    if layer.activation is not None:
        from ampq.kernels.activation import activation_linear

        return activation_linear(layer, x)
    return reference_linear(layer, x)
