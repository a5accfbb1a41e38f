"""Quantized matmul kernels, chosen per format, device and batch.

The reference kernel (decode, then matmul) is always available and is the ground truth that every
faster kernel is tested against.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

import torch

from ampq.kernels import cpu, cpu_slab
from ampq.kernels.reference import reference_linear

# "auto": the fastest kernel for the format, device and number of rows; "reference": always decode
# then matmul (exact to the format, the ground truth)
_DEFAULT_MODE = os.environ.get("AMPQ_KERNELS", "auto")


class _State(threading.local):
    """Per thread, so that one thread evaluating with the reference kernel (or calibrating with
    the decode cache) does not change what another thread serving the same model computes."""

    def __init__(self):
        self.mode = _DEFAULT_MODE
        self.cache: weakref.WeakKeyDictionary | None = None


_state = _State()


@contextlib.contextmanager
def use(mode: str):
    """Run the block with kernel selection ``mode`` ("auto" or "reference"), in this thread."""
    if mode not in ("auto", "reference"):
        raise ValueError(f"unknown kernel mode {mode!r}; choose auto or reference")
    outer, _state.mode = _state.mode, mode
    try:
        yield
    finally:
        _state.mode = outer


@contextlib.contextmanager
def dequantized_weights_cached():
    """Within this block, each QuantLinear decodes its weight once and reuses it: for calibration,
    which runs one block over many batches. Memory grows by the decoded weights used inside."""
    outer, _state.cache = _state.cache, weakref.WeakKeyDictionary()
    try:
        yield
    finally:
        _state.cache = outer


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    # the common CPU case first, in as few Python steps as possible: decoding a small model calls
    # this some 200 times per token, and each step here costs about a microsecond
    rows = layer.__dict__.get("_cpu_plain_rows")
    if rows is None:
        rows = layer.__dict__["_cpu_plain_rows"] = _cpu_plain_rows(layer)
    if rows and x.is_cpu and x.numel() <= rows * layer.in_features:
        state = _state
        if state.cache is None and state.mode == "auto":
            return cpu.packed_linear(layer, x)
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
    cache, mode = _state.cache, _state.mode
    if cache is not None:
        weight = cache.get(layer)
        if weight is None or weight.dtype != x.dtype:
            weight = cache[layer] = layer.dequantize(x.dtype)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return torch.nn.functional.linear(x, weight, bias)
    # the fast kernels read the stored codes, whose columns follow input_perm where there is one;
    # the reference kernel decodes the weight in the inputs' own order
    if mode == "auto" and x.is_cuda and _triton_ok(layer):
        from ampq.kernels.triton.lut_gemm import lut_linear

        return lut_linear(layer, _permuted(layer, x))
    if mode == "auto" and x.device.type == "cpu":
        if x.numel() <= _cpu_rows(layer) * x.shape[-1]:
            return cpu.packed_linear(layer, _permuted(layer, x))
        if _slab_ok(layer):
            return cpu_slab.slab_linear(layer, _permuted(layer, x))
    return reference_linear(layer, x)


def _permuted(layer, x: torch.Tensor) -> torch.Tensor:
    perm = getattr(layer, "input_perm", None)
    return x if perm is None else x.index_select(-1, perm.to(device=x.device, dtype=torch.long))


def _triton_ok(layer) -> bool:
    ok = layer.__dict__.get("_triton_ok")
    if ok is None:
        from ampq.kernels import triton as triton_kernels

        ok = False
        if triton_kernels.available():
            from ampq.kernels.lut import has_lut_form

            ok = has_lut_form(layer)
        layer.__dict__["_triton_ok"] = ok
    return ok


def _cpu_plain_rows(layer) -> int:
    """Rows up to which ``layer`` goes straight to the packed CPU kernel: one with no compute
    dtype, input scale, activation quantization or input permutation of its own (0: never)."""
    if layer.compute_dtype is not None or layer.input_scale is not None or layer.activation is not None \
            or getattr(layer, "input_perm", None) is not None:
        return 0
    return _cpu_rows(layer)


def _slab_ok(layer) -> bool:
    ok = layer.__dict__.get("_slab_ok")
    if ok is None:
        ok = layer.__dict__["_slab_ok"] = cpu_slab.supports(layer)
    return ok


def _cpu_rows(layer) -> int:
    rows = layer.__dict__.get("_cpu_rows")
    if rows is None:
        rows = layer.__dict__["_cpu_rows"] = cpu.max_rows(layer)
    return rows
