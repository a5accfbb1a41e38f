"""FP8 W8A8 on a GPU's fp8 tensor cores: ``torch._scaled_mm`` with one scale per token and one per
output channel, the same product that ``activation.py`` defines in float32 (its reference).

The activations are quantized per token as there (s_i = absmax(x_i) / max_finite, then round to
nearest even; torch's cast rounds the same way), the weight codes are used as stored (ampq's E4M3
and E5M2 are torch's ``float8_e4m3fn`` and ``float8_e5m2`` bit for bit), and the products are
summed in float32 by the tensor cores. Where the device or the shapes cannot take it (no fp8 units,
sizes not multiples of 16, E5M2 x E5M2), :func:`scaled_mm_linear` returns None and the caller runs
the float32 path.
"""

from __future__ import annotations

import torch

from ampq.formats.minifloat import MinifloatSpec
from ampq.kernels import triton as triton_kernels

_TORCH_FP8 = {(4, 3, "fn"): torch.float8_e4m3fn, (5, 2, "ieee"): torch.float8_e5m2}
_refused: set = set()  # (device, activation dtype, weight dtype, output dtype) that _scaled_mm refused


def _fp8_dtype(spec: MinifloatSpec):
    return _TORCH_FP8.get((spec.exp_bits, spec.man_bits, spec.special)) if spec.saturate else None


def _weight(layer, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's fp8 codes as a torch fp8 tensor (out, in) and float32 scales (1, out), cached."""
    cached = layer.kernel_cache.scaled_mm_weight
    if cached is not None and cached[0].device == device:
        return cached
    dtype = _fp8_dtype(layer.format.spec)
    if dtype is None:
        return None
    codes = layer.stored()["codes"].reshape(layer.out_features, layer.in_features)
    scale = layer.format.unpack(layer.stored(), layer.shape)[1].values["scale"].float().reshape(1, -1)
    cached = (codes.to(device).view(dtype), scale.expand(1, layer.out_features).contiguous().to(device))
    layer.kernel_cache.scaled_mm_weight = cached
    return cached


def _quantize_rows(x: torch.Tensor, dtype, spec: MinifloatSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda and triton_kernels.available():  # one kernel instead of six
        from ampq.kernels.triton.fp8_rows import fp8_rows  # here: triton is an optional dependency

        return fp8_rows(x.contiguous(), dtype, spec)
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True) / spec.max_finite
    return (xf / torch.where(s > 0, s, torch.ones_like(s))).to(dtype), s


def scaled_mm_linear(layer, x: torch.Tensor, spec: MinifloatSpec, cuda_only: bool = True) -> torch.Tensor | None:
    """(xq * s) @ W^T for 2-D CUDA ``x`` on the fp8 tensor cores, in bf16; None where not possible.
    ``cuda_only=False`` runs it on any device whose torch has ``_scaled_mm`` (the CPU, for tests)."""
    adtype = _fp8_dtype(spec)
    n, k = layer.out_features, layer.in_features
    if adtype is None or n % 16 or k % 16:
        return None
    if cuda_only and (not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 9)):
        return None
    weight = _weight(layer, x.device)
    if weight is None:
        return None
    wq, ws = weight
    key = (x.device, adtype, wq.dtype)
    if key in _refused:
        return None
    xq, s = _quantize_rows(x, adtype, spec)
    try:
        return torch._scaled_mm(xq, wq.t(), scale_a=s, scale_b=ws, out_dtype=torch.bfloat16)
    except RuntimeError:  # this build or device refuses the pair (E5M2 x E5M2, row-wise scales)
        _refused.add(key)
        return None
