"""The tensors of one layer in a compressed-tensors scheme, made by compressed-tensors' own
compressors (``PackedQuantizationCompressor``, pack-quantized, for integer weights;
``FloatQuantizationCompressor``, float-quantized, for FP8; ``NVFP4PackedCompressor`` and
``MXFP4PackedCompressor`` for ampq's ``nvfp4`` / ``mxfp4``, whose scales it keeps in E4M3 / E8M0) from the weight ampq decodes and the
scales (and zero points) that reproduce ampq's codes, or, for a layer re-quantized with
``nearest``, scales fitted to that weight. The weight the library decompresses comes back too,
for the driver's bit-for-bit check and the change it reports."""

from __future__ import annotations

import torch
from compressed_tensors.compressors import (FloatQuantizationCompressor, MXFP4PackedCompressor,
                                           NVFP4PackedCompressor, PackedQuantizationCompressor)
from torch import nn

from ampq.errors import AmpqError
from ampq.exporters.compressed_tensors.schemes import Scheme, int_params, per_group
from ampq.exporters.driver import base_of, decoded_weight
from ampq.formats.integer import IntegerFormat
from ampq.formats.microscaled import E4M3, mx_scale


def _grouped(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    if scheme.strategy == "tensor":
        return w.reshape(1, 1, -1)
    width = scheme.group_size if scheme.strategy == "group" else w.shape[1]
    return w.reshape(w.shape[0], -1, width)


def _fit_dtype(model_dtype: torch.dtype, ampq_dtype: torch.dtype) -> torch.dtype:
    # Fitted scales are rounded to the model's 16-bit dtype (what engines hold them in), else to the
    # precision ampq's own formats keep.
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else ampq_dtype


def _same_grid(layer, scheme: Scheme) -> bool:
    """Whether ``layer`` is a plain symmetric integer layer whose groups tile ``scheme``'s: its
    scales then carry over group by group and hold the same values (int3-sym as int4-sym)."""
    fmt = getattr(layer, "format", None)
    if (layer is None or not isinstance(fmt, IntegerFormat) or layer.input_scale is not None
            or layer.input_perm is not None):
        return False
    if not (fmt.symmetric and scheme.symmetric and scheme.type == "int" and fmt.bits <= scheme.bits):
        return False
    if scheme.strategy == "channel":
        return not fmt.group_size
    if scheme.strategy == "group" and fmt.group_size:
        return fmt.group_size % scheme.group_size == 0 and (layer.in_features % fmt.group_size) % scheme.group_size == 0
    return False


def _fit(w: torch.Tensor, scheme: Scheme, model_dtype: torch.dtype, layer=None):
    """Scale and signed zero point (or None) re-quantizing ``w`` (float32) to ``scheme``. ``layer``:
    the ampq layer ``w`` was decoded from, when its scales may be carried over (no input scale)."""
    g = _grouped(w, scheme)
    if scheme.type == "float":
        dtype = torch.float32 if scheme.strategy == "tensor" else _fit_dtype(model_dtype, torch.bfloat16)
        scale = (g.abs().amax(dim=2) / 448.0).to(dtype).float()
        scale = scale.reshape(1) if scheme.strategy == "tensor" else scale
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    half, qmax = 1 << (scheme.bits - 1), (1 << scheme.bits) - 1
    same_grid = layer is not None and _same_grid(layer, scheme)
    dtype = _fit_dtype(model_dtype, torch.float16)
    if scheme.symmetric:
        if same_grid:  # a narrower symmetric integer: the same scales hold the same values
            return int_params(layer, scheme)[:2]
        scale = (g.abs().amax(dim=2) / (half - 1)).to(dtype).float()
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    # with zero points: min-max over each group, the range stretched to hold 0 (so the zero point fits)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / qmax).to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, (zero - half).to(torch.int8)


_COMPRESSORS = {"int": PackedQuantizationCompressor, "float": FloatQuantizationCompressor,
                "nvfp4": NVFP4PackedCompressor, "mxfp4": MXFP4PackedCompressor}


def _compress(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme,
              global_scale: torch.Tensor | None = None):
    """compressed-tensors' tensors for one layer (local names) and the weight it decompresses them to."""
    ct_scheme = scheme.build(["Linear"])
    compressor = _COMPRESSORS[scheme.type]
    state = {"weight": w.float().contiguous(), "weight_scale": scale.float().contiguous()}
    if zero is not None:
        state["weight_zero_point"] = zero.contiguous()
    if global_scale is not None:
        state["weight_global_scale"] = global_scale.float().reshape(1)
    packed = dict(compressor.compress(state, ct_scheme))
    decoded = compressor.decompress(dict(packed), ct_scheme)["weight"].float()
    return packed, decoded


def _scale_dtype(scale: torch.Tensor, candidates: list[torch.dtype]) -> torch.dtype:
    """The first of ``candidates`` that holds every scale exactly (float32 always does)."""
    for dtype in candidates:
        if torch.equal(scale.to(dtype).float(), scale):
            return dtype
    return torch.float32


def _parts(layer: nn.Module, scheme: Scheme, exact: bool, model_dtype: torch.dtype):
    """(the float32 weight ampq decodes, the scale and signed zero point (or None) that write it in ``scheme``)."""
    base = base_of(layer)
    weight = decoded_weight(layer)
    if exact and scheme.type == "int":
        scale, zero, _ = int_params(base, scheme)
    elif exact:
        fmt = base.format
        _, params = fmt.unpack(base.stored(), base.shape)
        scale = per_group(fmt, params.values, base.shape, scheme)["scale"]
        scale, zero = torch.where(scale > 0, scale, torch.ones_like(scale)), None
    else:
        plain = base if not getattr(layer, "residuals", None) else None
        scale, zero = _fit(weight, scheme, model_dtype, plain)
    return weight, scale, zero


def _written(weight, scale, zero, scheme: Scheme, model_dtype: torch.dtype):
    """(the tensors of one layer, local names; the weight compressed-tensors decompresses them to)."""
    tensors, decoded = _compress(weight, scale, zero, scheme)
    ampq_dtype = torch.float16 if scheme.type == "int" else (torch.bfloat16 if scheme.strategy == "channel"
                                                             else torch.float32)
    # the model's dtype where it holds every scale exactly (compressed-tensors decodes in the scale's
    # dtype, so float32 scales keep a float32 model's weights exact), else the precision ampq keeps
    tensors["weight_scale"] = scale.to(_scale_dtype(scale, [model_dtype, ampq_dtype]))
    return tensors, decoded


def layer_tensors(layer: nn.Module, scheme: Scheme | None, exact: bool, model_dtype: torch.dtype):
    """(compressed-tensors' tensors for ``layer`` in ``scheme``, names local to the layer; the weight
    they decompress to; the weight ampq decodes). A 16-bit layer (``scheme`` None) is written as
    stored, with nothing to compare."""
    parts, decoded, weight = split_tensors(layer, scheme, exact, model_dtype, [layer.shape[0]])
    return parts[0], decoded, weight


def split_tensors(layer: nn.Module, scheme: Scheme | None, exact: bool, model_dtype: torch.dtype,
                  rows: list[int]):
    """:func:`layer_tensors` for ``layer``'s outputs cut into consecutive layers of ``rows`` outputs
    each (an expert's fused gate/up written as its gate and its up): a list of tensors, one per
    part; the weight they decompress to, parts joined; the weight ampq decodes."""
    base = base_of(layer)
    bias = layer.bias.detach().split(rows) if layer.bias is not None else [None] * len(rows)
    if scheme is None:
        parts = [{"weight": w} for w in base.stored()["weight"].reshape(layer.shape).split(rows)]
        decoded = weight = None
    elif scheme.fp4:  # exact only (nothing is re-quantized to FP4): the format's own scales
        if len(rows) > 1:
            raise AmpqError("FP4 (nvfp4/mxfp4) experts are not written per expert for vLLM yet: quantize the experts "
                            "in an integer or FP8 format, or keep them in 16 bits, and export again")
        weight = decoded_weight(layer)
        stored = base.stored()
        # the group scales as compressed-tensors holds them before compressing: E4M3 values (NVFP4,
        # whose decoding divides them by the global scale) or powers of two (MXFP4)
        codes = stored["scale"].reshape(base.out_features, -1)
        scale = E4M3.decode(codes.to(torch.int32)) if scheme.type == "nvfp4" else mx_scale(codes)
        tensors, decoded = _compress(weight, scale, None, scheme, stored.get("global_scale"))
        parts = [tensors]
    else:
        weight, scale, zero = _parts(layer, scheme, exact, model_dtype)

        def cut(t):  # per-row tensors are cut with the weight; a per-tensor scale serves every part
            return t.split(rows) if t is not None and t.shape[0] == weight.shape[0] else [t] * len(rows)

        written = [_written(w, s, z, scheme, model_dtype) for w, s, z in zip(weight.split(rows), cut(scale), cut(zero))]
        parts = [t for t, _ in written]
        decoded = torch.cat([d for _, d in written])
    for tensors, b in zip(parts, bias):
        if b is not None:
            tensors["bias"] = b
    return parts, decoded, weight
