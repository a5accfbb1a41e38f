"""Which compressed-tensors scheme holds an ampq layer: exactly (the same codes and scales), or
nearest (re-quantized), and the scales and zero points that give ampq's codes in a scheme.

Exact:

- ``intK-gN-sym``, ``-ch-sym``, ``-t-sym`` (K = 4 or 8): ampq's w = scale * (q - 2^(K-1)) is
  compressed-tensors' symmetric w = scale * q_signed. A whole-tensor scale is repeated per channel
  (vLLM's weight-only integer kernels take groups or channels).
- ``intK-gN``, ``-ch`` (asymmetric, K = 4 or 8) only where every group's -min/scale is an integer
  in [0, 2^K - 1]: compressed-tensors' zero points are integers (packed into int32 like the codes;
  vLLM's kernels take uint4/uint8 zero points; the pack-quantized compressor refuses anything
  but int8), while ampq's minimum is any fp16 number. For fitted weights that is almost never
  so, and such layers need ``nearest``.
- ``fp8-e4m3-ch``, ``fp8-e4m3`` (per-tensor), also with ``fp8-e4m3-token`` activations (W8A8 with a
  dynamic per-token FP8 input scale).
- ``nvfp4`` and ``mxfp4`` (compressed-tensors' ``NVFP4A16`` and ``MXFP4A16`` presets, written by its
  ``NVFP4PackedCompressor`` / ``MXFP4PackedCompressor``) where the groups divide the inputs: ampq
  computes their scales with compressed-tensors' own arithmetic and decodes NVFP4 to the bfloat16
  weight compressed-tensors decompresses to (:mod:`ampq.formats.microscaled`).
- A group of N that does not divide the layer's inputs (ampq's partial last group) is written as
  groups of gcd(N, inputs) >= 32 with the scales repeated, which holds the same values.

Not expressible: int2/3/5/6/7, NF4/FP4, minifloats other than FP8 E4M3 per channel or tensor, FP8
groups, AWQ input scales kept outside the weights, LLM.int8 outlier or E5M2 activations, adaptive
layers above their base level: :func:`nearest_scheme` says what they become with ``nearest``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16
from torch import nn

from ampq.exporters.driver import base_of
from ampq.formats.integer import IntegerFormat
from ampq.formats.microscaled import MicroscaledFP4Format
from ampq.formats.minifloat import MinifloatFormat
from ampq.formats.normal_float import NormalFloatFormat

MIN_GROUP = 32  # smallest group written when ampq's group does not divide the inputs
FP4_PRESETS = {"nvfp4": NVFP4A16, "mxfp4": MXFP4A16}  # compressed-tensors' own weight-only presets


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors scheme: what one config group says about its layers."""

    type: str  # "int", "float" (FP8) or "nvfp4" / "mxfp4" (compressed-tensors' presets)
    bits: int
    strategy: str  # "group", "channel" or "tensor"
    group_size: int | None = None
    symmetric: bool = True
    fp8_tokens: bool = False  # dynamic per-token FP8 input activations (W8A8)

    @property
    def fp4(self) -> bool:
        return self.type in FP4_PRESETS

    @property
    def compression(self) -> str:
        if self.fp4:
            return f"{self.type}-pack-quantized"
        return "pack-quantized" if self.type == "int" else "float-quantized"

    def describe(self) -> str:
        if self.fp4:
            return f"{self.type} (fp4 e2m1, group {self.group_size})"
        if self.type == "float":
            text = f"fp8-e4m3 per {self.strategy}"
        else:
            gran = f"group {self.group_size}" if self.strategy == "group" else f"per {self.strategy}"
            text = f"int{self.bits} {gran} {'symmetric' if self.symmetric else 'with zero points'}"
        return text + (" + fp8 per-token activations" if self.fp8_tokens else "")

    def build(self, targets: list[str]) -> QuantizationScheme:
        if self.fp4:
            return QuantizationScheme(targets=list(targets), format=self.compression, **FP4_PRESETS[self.type])
        weights = QuantizationArgs(num_bits=self.bits, type=self.type, symmetric=self.symmetric,
                                   strategy=self.strategy, group_size=self.group_size, dynamic=False)
        inputs = None
        if self.fp8_tokens:
            inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(targets=list(targets), weights=weights, input_activations=inputs,
                                  format=self.compression)


def _groups(group_size: int | None, in_features: int) -> tuple[str, int | None] | None:
    """compressed-tensors' (strategy, group size) that holds ampq's grouping exactly, or None."""
    if not group_size:  # None: one group per output channel; 0: one for the tensor, repeated per channel
        return "channel", None
    if in_features % group_size == 0:
        return "group", group_size
    g = math.gcd(group_size, in_features)
    return ("group", g) if g >= MIN_GROUP else None


def _is_e4m3(fmt) -> bool:
    s = fmt.spec
    return (s.exp_bits, s.man_bits, s.bias, s.special) == (4, 3, 7, "fn")


def exact_scheme(layer: nn.Module) -> tuple[Scheme | None, str]:
    """(the scheme that holds ``layer`` exactly, "") or (None, why none does)."""
    if getattr(layer, "residuals", None):
        return None, "adaptive layers above their base level add two formats"
    base = base_of(layer)
    fmt = base.format
    act = (base.activation or "").strip().lower() or None
    if base.input_scale is not None:
        return None, "AWQ input scales kept outside the weights (compressed-tensors has no per-input scale)"
    if base.input_perm is not None:
        return None, "GPTQ act-order groups (ampq does not write compressed-tensors' g_idx)"
    if isinstance(fmt, IntegerFormat):
        if act is not None:
            return None, f"{act} activations (compressed-tensors has no outlier decomposition)"
        if fmt.bits not in (4, 8):
            return None, f"{fmt.bits}-bit codes (vLLM's pack-quantized kernels take 4 and 8 bits)"
        groups = _groups(fmt.group_size, base.in_features)
        if groups is None:
            return None, (f"groups of {fmt.group_size} do not divide {base.in_features} inputs "
                          f"and leave no common group of {MIN_GROUP} or more")
        scheme = Scheme("int", fmt.bits, groups[0], groups[1], fmt.symmetric)
        if not fmt.symmetric and fmt.bits != 4:
            return None, "8-bit codes with zero points (vLLM's kernels take zero points with 4-bit codes only)"
        if not fmt.symmetric and not bool(int_params(base, scheme)[2].all()):
            return None, ("w = min + scale * q with -min/scale not an integer in the code range, and "
                          "compressed-tensors' zero points are integers")
        return scheme, ""
    if isinstance(fmt, MinifloatFormat):
        if not (fmt.bits == 8 and _is_e4m3(fmt)):
            return None, f"{fmt.name}: compressed-tensors' minifloat weights are FP8 E4M3"
        if fmt.group_size not in (None, 0):
            return None, "FP8 groups (vLLM's FP8 weights have one scale per channel or per tensor)"
        if act not in (None, "fp8-e4m3-token"):
            return None, f"{act} activations (compressed-tensors' FP8 activations are E4M3)"
        return Scheme("float", 8, "channel" if fmt.group_size is None else "tensor",
                      fp8_tokens=act == "fp8-e4m3-token"), ""
    if isinstance(fmt, MicroscaledFP4Format):
        if act is not None:
            return None, f"{act} activations (ampq exports {fmt.name} weight-only)"
        if base.in_features % fmt.group_size:
            return None, (f"{base.in_features} inputs are not a multiple of {fmt.name}'s groups of {fmt.group_size} "
                          "(compressed-tensors and vLLM need whole groups)")
        strategy = "tensor_group" if fmt.kind == "nvfp4" else "group"
        return Scheme(fmt.kind, 4, strategy, fmt.group_size), ""
    if isinstance(fmt, NormalFloatFormat):
        return None, "a 16-value codebook with a float32 absmax per block, not an integer grid"
    return None, f"{fmt.name} has no compressed-tensors counterpart"


def _nearest_groups(group_size: int | None, in_features: int) -> tuple[str, int | None]:
    exact = _groups(group_size, in_features)
    if exact is not None:
        return exact
    for g in (128, 64, 32):
        if g <= group_size and in_features % g == 0:
            return "group", g
    return "channel", None


def nearest_scheme(layer: nn.Module) -> Scheme:
    """The expressible scheme a layer with no exact counterpart is re-quantized to.

    Integers widen to the next width vLLM runs (int2/int3 -> int4, int5-7 -> int8) with the same
    groups (or the largest of 128/64/32 that divides the inputs, else per channel): symmetric stays
    symmetric (the same scales then hold the same values: nothing moves); asymmetric codes of up
    to 4 bits become int4 with integer zero points, fitted min-max to the decoded weights (for
    int4 that is ampq's step with the minimum rounded to a whole step, wherever the codes span
    the range), wider ones symmetric int8 (vLLM takes zero points with 4 bits only). NF4/FP4 and
    minifloats of 4 to 7 bits become symmetric int4/int8 with the same blocks; 8-bit minifloats
    become FP8 E4M3 per channel (per tensor stays per tensor), their activations FP8 E4M3 per
    token. Adaptive layers above their base level become int8 per channel. AWQ input scales are
    folded into the weights first; LLM.int8's outlier activations are dropped (the weights stay).
    """
    base = base_of(layer)
    fmt = base.format
    in_f = base.in_features
    act = (base.activation or "").strip().lower()
    if getattr(layer, "residuals", None):
        return Scheme("int", 8, "channel")
    if isinstance(fmt, MinifloatFormat) and fmt.bits == 8:
        return Scheme("float", 8, "tensor" if fmt.group_size == 0 else "channel",
                      fp8_tokens=act.startswith("fp8-") and act.endswith("-token"))
    bits = 4 if fmt.bits <= 4 else 8
    strategy, g = _nearest_groups(getattr(fmt, "group_size", None), in_f)
    symmetric = not (isinstance(fmt, IntegerFormat) and not fmt.symmetric and bits == 4)
    return Scheme("int", bits, strategy, g, symmetric)


def per_group(fmt, values: dict[str, torch.Tensor], shape: tuple[int, int], scheme: Scheme) -> dict:
    """ampq's per-group values in compressed-tensors' layout: (out, in / group) or (out, 1), or
    (1,) per tensor. Valid where each compressed-tensors group lies inside one of ampq's groups."""
    result = {}
    for key in ("scale", "min"):
        if key not in values:
            continue
        if scheme.strategy == "tensor":
            result[key] = values[key].reshape(1).float()
            continue
        full = fmt.expand({key: values[key]}, shape)[key]
        picked = full[:, :: scheme.group_size] if scheme.strategy == "group" else full[:, :1]
        result[key] = picked.float().contiguous()
    return result


def int_params(layer, scheme: Scheme):
    """Scale, signed zero point (or None) and a per-group "exact" mask that give ampq's integer codes
    in ``scheme``: the weight decoded by compressed-tensors is ampq's, bit for bit, where the mask holds."""
    fmt = layer.format
    _, params = fmt.unpack(layer.stored(), layer.shape)
    v = per_group(fmt, params.values, layer.shape, scheme)
    scale = v["scale"]
    if fmt.symmetric:  # an all-zero group has scale 0 and codes at the zero point: any scale holds it
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None, torch.ones_like(scale, dtype=torch.bool)
    qmax, half = (1 << fmt.bits) - 1, 1 << (fmt.bits - 1)
    s, m = scale.double(), v["min"].double()
    k = torch.round(-m / torch.where(s > 0, s, torch.ones_like(s)))
    ok = (s > 0) & (m + k * s == 0) & (k >= 0) & (k <= qmax)
    # A constant group (scale 0) holds its minimum m: scale |m| with code 1 over zero point 0 (m > 0)
    # or code 0 under zero point 1 (m < 0); m = 0 needs nothing.
    const = s == 0
    scale = torch.where(const, torch.where(m == 0, torch.ones_like(m), m.abs()), s).float()
    zero = torch.where(const, (m < 0).double(), k).clamp(0, qmax)
    return scale, (zero - half).to(torch.int8), ok | const
