"""Quantized matmul kernels, chosen per format, device and batch.

The reference kernel (decode, then matmul) is always available and is the ground truth that every
faster kernel is tested against.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from ampq.kernels.reference import reference_linear

_cache: weakref.WeakKeyDictionary | None = None


@contextlib.contextmanager
def dequantized_weights_cached():
    """Within this block, each QuantLinear decodes its weight once and reuses it: for calibration,
    which runs one block over many batches. Memory grows by the decoded weights used inside."""
    global _cache
    outer, _cache = _cache, weakref.WeakKeyDictionary()
    try:
        yield
    finally:
        _cache = outer


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.compute_dtype is not None:
        from ampq.models import parse_dtype

        dtype = parse_dtype(layer.compute_dtype)
        if x.dtype != dtype:
            return _linear(layer, x.to(dtype)).to(x.dtype)
    return _linear(layer, x)


def _linear(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.input_scale is not None:
        x = x / layer.input_scale.to(x.dtype)
    if layer.activation is not None:
        from ampq.kernels.activation import activation_linear

        return activation_linear(layer, x)
    if _cache is not None:
        weight = _cache.get(layer)
        if weight is None or weight.dtype != x.dtype:
            weight = _cache[layer] = layer.dequantize(x.dtype)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return torch.nn.functional.linear(x, weight, bias)
    return reference_linear(layer, x)
