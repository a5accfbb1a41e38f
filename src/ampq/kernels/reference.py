"""The reference kernel: decode the whole weight, then a dense matmul in the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_linear(layer, x: torch.Tensor) -> torch.Tensor:
    weight = layer.dequantize(x.dtype)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return F.linear(x, weight, bias)
