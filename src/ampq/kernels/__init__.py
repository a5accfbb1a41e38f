"""Quantized matmul kernels, chosen per format, device and batch.

The reference kernel (decode, then matmul) is always available and is the ground truth that every
faster kernel is tested against.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref

import torch

from ampq.kernels import cpu, cpu_planes, cpu_slab
from ampq.kernels.reference import reference_linear

# "auto": the fastest kernel for the format, device and number of rows; "lean": on the CPU, only
# kernels that keep no repacked copy of a weight beside its stored codes (16-bit weights read as
# they are, the slab kernel, else the reference); "reference": always decode then matmul (exact to
# the format, the ground truth)
MODES = ("auto", "lean", "reference")
_DEFAULT_MODE = os.environ.get("AMPQ_KERNELS", "auto")
if _DEFAULT_MODE not in MODES:
    warnings.warn(f"AMPQ_KERNELS={_DEFAULT_MODE!r} is not a kernel mode, so 'auto' is used; set it to one of "
                  f"{', '.join(MODES)}", stacklevel=2)
    _DEFAULT_MODE = "auto"


class _State(threading.local):
    """Per thread, so that one thread evaluating with the reference kernel (or calibrating with
    the decode cache) does not change what another thread serving the same model computes."""

    def __init__(self):
        self.mode = _DEFAULT_MODE
        self.cache: weakref.WeakKeyDictionary | None = None


_state = _State()


@contextlib.contextmanager
def use(mode: str):
    """Run the block with kernel selection ``mode`` ("auto", "lean" or "reference"), in this thread."""
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; choose one of {', '.join(MODES)}")
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
    plain = layer.__dict__.get("_cpu_plain")
    if plain is None:
        plain = layer.__dict__["_cpu_plain"] = _cpu_plain(layer)
    rows, kernel = plain
    if rows and x.is_cpu and x.numel() <= rows * layer.in_features:
        state = _state
        if state.cache is None and state.mode == "auto":
            return kernel(layer, x)
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
    if mode != "reference" and x.device.type == "cpu":
        kernel = cpu_kernel(layer, x.numel() // x.shape[-1], mode)
        if kernel is not reference_linear:
            return kernel(layer, _permuted(layer, x))
    return reference_linear(layer, x)


def cpu_kernel(layer, rows: int, mode: str = "auto"):
    """The CPU kernel that runs ``layer`` on ``rows`` rows of inputs in ``mode``."""
    if mode == "reference":
        return reference_linear
    if rows <= _cached(layer, "_plain_rows", cpu.plain_rows):
        return cpu.plain_linear
    if mode == "auto" and rows <= _cached(layer, "_cpu_rows", cpu.max_rows):
        return cpu.packed_linear
    slab = _cached(layer, "_slab_ok", cpu_slab.supports)
    if mode == "auto" and rows <= (cpu_planes.MAX_ROWS if slab else cpu_planes.MAX_ROWS_WITHOUT_SLAB) \
            and _cached(layer, "_planes_ok", cpu_planes.supports):
        return cpu_planes.planes_linear
    return cpu_slab.slab_linear if slab else reference_linear


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


def _cpu_plain(layer) -> tuple:
    """(rows, kernel): up to how many rows ``layer`` goes straight to a fast CPU kernel, for a
    layer with no compute dtype, input scale, activation quantization or input permutation of its
    own ((0, None): never)."""
    if layer.compute_dtype is not None or layer.input_scale is not None or layer.activation is not None \
            or getattr(layer, "input_perm", None) is not None:
        return 0, None
    if cpu.plain_rows(layer):
        return cpu.plain_rows(layer), cpu.plain_linear
    if cpu.supports(layer):
        return cpu.max_rows(layer), cpu.packed_linear
    if cpu_planes.supports(layer):
        return cpu_planes.MAX_ROWS, cpu_planes.planes_linear
    return 0, None


def _cached(layer, key: str, check):
    value = layer.__dict__.get(key)
    if value is None:
        value = layer.__dict__[key] = check(layer)
    return value
