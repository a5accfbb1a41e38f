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

from ampq import memory
from ampq.errors import AmpqError
from ampq.dtypes import parse_dtype
from ampq.kernels import cpu, cpu_bf16, cpu_planes, cpu_slab
from ampq.kernels import triton as triton_kernels
from ampq.kernels.activation import activation_linear
from ampq.kernels.cache import KernelCache
from ampq.kernels.lut import has_lut_form
from ampq.kernels.reference import reference_linear

__all__ = ["MODES", "KernelCache", "cpu_kernel", "dequantized_weights_cached", "linear", "prepare", "use"]

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
    if torch.compiler.is_compiling():
        return _traced_linear(layer, x)
    # the common CPU case first, in as few Python steps as possible: decoding a small model calls
    # this some 200 times per token, and each step here costs about a microsecond. The short path
    # is set by the first call that chose a fast kernel for the layer (_linear)
    fast = layer.kernel_cache.short_path
    if fast is not None and x.is_cpu and x.numel() <= fast[0] * layer.in_features:
        state = _state
        if state.cache is None and state.mode == "auto":
            return fast[1](layer, x)
    if layer.compute_dtype is not None:
        dtype = parse_dtype(layer.compute_dtype)
        if x.dtype != dtype:
            return _linear(layer, x.to(dtype)).to(x.dtype)
    return _linear(layer, x)


@torch.no_grad()
def prepare(layer, rows: int, dtype: torch.dtype = torch.float32) -> None:
    """Make now everything the kernel that runs ``layer`` on ``rows`` rows of ``dtype`` inputs derives
    from the stored tensors (the kernel choice, repacked copies, tables), in this thread's mode, by
    running it once on zeros: a traced forward (torch.compile) then only reads the layer's state."""
    cache = layer.kernel_cache
    if rows in cache.prepared_rows:
        return
    device = next(iter(layer.stored().values())).device
    linear(layer, torch.zeros(rows, layer.in_features, dtype=dtype, device=device))
    cache.prepared_rows = cache.prepared_rows | {rows}


def _traced_linear(layer, x: torch.Tensor) -> torch.Tensor:
    # under tracing the kernel choice is made once, for the traced shapes; making a repacked copy
    # here would put the repacking into the compiled graph, to be redone on every call
    if x.is_cpu and x.numel() // x.shape[-1] not in layer.kernel_cache.prepared_rows:
        raise AmpqError(f"a quantized layer ({layer.format_name}, {layer.in_features}x{layer.out_features}) was traced "
                        f"for {x.numel() // x.shape[-1]} rows without its kernel prepared; compile models with "
                        "ampq.compile, or call ampq.kernels.prepare on each QuantLinear first")
    if layer.compute_dtype is not None:
        dtype = parse_dtype(layer.compute_dtype)
        if x.dtype != dtype:
            return _linear(layer, x.to(dtype)).to(x.dtype)
    return _linear(layer, x)


def _linear(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.input_scale is not None:
        x = x / layer.input_scale.to(x.dtype)
    if layer.activation is not None:
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
        from ampq.kernels.triton.lut_gemm import lut_linear  # here: triton is an optional dependency

        return lut_linear(layer, _permuted(layer, x))
    if mode != "reference" and x.device.type == "cpu":
        kernel = cpu_kernel(layer, x.numel() // x.shape[-1], mode)
        if mode == "auto" and layer.kernel_cache.short_path is None:
            _set_short_path(layer, kernel)
        if kernel is not reference_linear:
            return kernel(layer, _permuted(layer, x))
    return reference_linear(layer, x)


def cpu_kernel(layer, rows: int, mode: str = "auto"):
    """The CPU kernel that runs ``layer`` on ``rows`` rows of inputs in ``mode``."""
    if mode == "reference":
        return reference_linear
    cache = layer.kernel_cache
    if cache.plain_rows is None:
        cache.plain_rows, cache.packed_rows = cpu.plain_rows(layer), cpu.max_rows(layer)
        cache.slab_ok, cache.planes_ok = cpu_slab.supports(layer), cpu_planes.supports(layer)
    if rows <= cache.plain_rows:
        return cpu.plain_linear
    if mode == "auto" and rows >= cpu_bf16.MIN_ROWS and cache.slab_ok and cpu_bf16.native():
        return cpu_bf16.bf16_linear  # a prompt, on a processor that multiplies bf16 natively
    if mode == "auto" and rows <= cache.packed_rows and _may_copy(layer, "packed", cpu.copy_bytes):
        return cpu.packed_linear
    slab = cache.slab_ok
    if mode == "auto" and rows <= _planes_rows(layer, slab) and cache.planes_ok \
            and _may_copy(layer, "planes", cpu_planes.copy_bytes):
        return cpu_planes.planes_linear
    return cpu_slab.slab_linear if slab else reference_linear


def _planes_rows(layer, slab: bool) -> int:
    return cpu_planes.MAX_ROWS if slab else cpu_planes.MAX_ROWS_WITHOUT_SLAB


# The CPU kernels' repacked copies are made only while they leave this much memory free (the larger
# of the two); past it, a layer stays on the kernels that keep none, and one warning says so
MIN_FREE_BYTES = 1 << 30
MIN_FREE_FRACTION = 0.10
_short_of_memory_told = False


def _may_copy(layer, copy: str, copy_bytes) -> bool:
    """Whether ``layer`` holds, or may now make, the repacked copy its kernel keeps in the cache
    field ``copy`` ("packed" or "planes"). Asked right before the kernel's first call, so the
    copies made before count."""
    cache = layer.kernel_cache
    if getattr(cache, copy) is not None:
        return True
    refused = getattr(cache, f"{copy}_refused")
    if refused is None:
        available, total = memory.available_memory()
        refused = available - copy_bytes(layer) < max(MIN_FREE_BYTES, MIN_FREE_FRACTION * total)
        setattr(cache, f"{copy}_refused", refused)
        global _short_of_memory_told
        if refused and not _short_of_memory_told:
            _short_of_memory_told = True
            warnings.warn(f"only {available / 2**30:.1f} GiB of memory is free: layers from here on run without the "
                          "CPU kernels' repacked weight copies, on slower kernels (AMPQ_KERNELS=lean does this for "
                          "every layer)", stacklevel=4)
    return not refused


def _permuted(layer, x: torch.Tensor) -> torch.Tensor:
    perm = getattr(layer, "input_perm", None)
    return x if perm is None else x.index_select(-1, perm.to(device=x.device, dtype=torch.long))


def _triton_ok(layer) -> bool:
    cache = layer.kernel_cache
    if cache.triton_ok is None:
        cache.triton_ok = triton_kernels.available() and has_lut_form(layer)
    return cache.triton_ok


def _set_short_path(layer, kernel) -> None:
    """Let later calls of ``layer`` reach ``kernel`` straight from :func:`linear`, up to the rows it
    serves, where ``kernel`` is a fast one and the layer has no compute dtype, input scale,
    activation quantization or input permutation of its own."""
    cache = layer.kernel_cache
    if layer.compute_dtype is not None or layer.input_scale is not None or layer.activation is not None \
            or getattr(layer, "input_perm", None) is not None:
        cache.short_path = (0, None)
    elif kernel is cpu.plain_linear:
        cache.short_path = (cpu.plain_rows(layer), kernel)
    elif kernel is cpu.packed_linear:
        cache.short_path = (cpu.max_rows(layer), kernel)
    elif kernel is cpu_planes.planes_linear:
        cache.short_path = (_planes_rows(layer, cpu_slab.supports(layer)), kernel)
