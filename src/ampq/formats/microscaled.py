"""Microscaled FP4: E2M1 codes in small groups, as compressed-tensors (0.20) writes them for vLLM.

``nvfp4``: groups of 16, each with an FP8 E4M3 scale, and one float32 global scale per tensor
(compressed-tensors' ``NVFP4A16`` preset, ``nvfp4-pack-quantized``): 4 + 8/16 bits per weight plus
4 bytes. ``mxfp4``: groups of 32, each with an E8M0 scale (a power of two stored as its biased
exponent byte; the ``MXFP4A16`` preset, ``mxfp4-pack-quantized``): 4 + 8/32 bits per weight.

The arithmetic is compressed-tensors' own, step by step in float32, so that the codes and scales
equal what llm-compressor's round to nearest makes from the same float32 weight:

- NVFP4 global scale (``generate_gparam``): g = 448 * 6 / absmax(tensor), 1 where that is not
  finite. Group scale (``calculate_qparams``): s = e4m3((absmax(group) / 6) * g), 0.125 where that
  rounds to 0. Codes: e2m1(w / (s / g)). Decoded weight: bf16(e2m1 * (s / g)), because
  compressed-tensors decompresses NVFP4 to bfloat16 (and vLLM computes in 16 bits); ampq's decoded
  weight is that value, so an export is exact.
- MXFP4 scale (``generate_mx_scales``): the group's absmax rounded to a power of two by adding a
  quarter of its binade to the float32 bits and dropping the mantissa (so it rounds up from
  1.75 * 2^k), then e = clamp(127 + log2(that) - 2, 0, 255) and s = 2^(e - 127). Codes: e2m1(w / s),
  which saturates at 6 for groups whose absmax lies between 1.5 * 2^k and 1.75 * 2^k. Decoded
  weight: e2m1 * s, exact in any float dtype.
- e2m1 rounding (``cast_to_fp4``) is round to nearest, ties to even, after a clamp to +-6: the
  :class:`MinifloatSpec` E2M1 rounding; its sign bit is that of ``torch.sign``, so -0.0 gives +0.

llm-compressor computes the NVFP4 scales in the model's dtype: from a bf16 weight, absmax / 6 and
the global scale are first rounded to bf16, which can move a group scale by one E4M3 step. ampq
quantizes from float32, as llm-compressor does for a float32 model.
"""

from __future__ import annotations

import torch

from ampq.formats.base import Format, Params
from ampq.formats.minifloat import MinifloatSpec

E2M1 = MinifloatSpec(2, 1)  # max 6, no inf or NaN
E4M3 = MinifloatSpec(4, 3)  # float8_e4m3fn, max 448
_FP4_MAX, _FP8_MAX = 6.0, 448.0
_ZERO_SCALE = 0.125  # compressed-tensors' stand-in for an E4M3 group scale that rounds to 0
_TINY = torch.finfo(torch.float32).tiny
_MX_OFFSET = 2  # floor(log2(6)): the exponent the group's absmax keeps above the scale's
_MX_ROUND = 1 << 21  # a quarter of a float32 binade (mantissa 23 bits, E2M1's 1)
_SIGN_EXPONENT = 0x1FF << 23

KINDS = {"nvfp4": 16, "mxfp4": 32}


def nvfp4_global_scale(absmax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam`` for one tensor's absmax: (1,) float32."""
    g = (_FP8_MAX * _FP4_MAX) / absmax.float().clamp(min=_TINY)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


def mx_exponent(absmax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``generate_mx_scales`` for float32 group absmaxes: E8M0 bytes (uint8)."""
    bits = absmax.float().contiguous().view(torch.int32)
    power_of_two = ((bits + _MX_ROUND) & _SIGN_EXPONENT).view(torch.float32)
    e = 127 + torch.floor(torch.log2(power_of_two)) - _MX_OFFSET  # -inf for an all-zero group
    return torch.round(e.clamp(0, 255)).to(torch.uint8)


def mx_scale(exponent: torch.Tensor) -> torch.Tensor:
    """2^(e - 127), float32 (e = 0 is the subnormal 2^-127)."""
    return 2.0 ** (exponent.to(torch.int32) - 127).float()


class MicroscaledFP4Format(Format):
    bits = 4

    def __init__(self, kind: str, name: str | None = None, tensor_absmax: torch.Tensor | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.kind, self.name, self.group_size = kind, name or kind, KINDS[kind]
        # NVFP4's global scale spans every group: GPTQ fits the parameters up front
        self.groupwise_params = kind == "mxfp4"
        # the absmax the global scale is taken from, where it is shared with fused layers
        self.tensor_absmax = tensor_absmax

    def shared_over(self, weights: list[torch.Tensor]) -> "MicroscaledFP4Format":
        # vLLM decodes fused NVFP4 layers with the largest of their global scales, and
        # llm-compressor gives them one, from the absmax over all of them
        if self.kind != "nvfp4" or len(weights) < 2:
            return self
        absmax = torch.stack([w.detach().abs().amax().float() for w in weights]).amax()
        return MicroscaledFP4Format(self.kind, self.name, absmax)

    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> Params:
        group_absmax, clip = self.group_absmax(w, clip)
        absmax = group_absmax * clip
        if self.kind == "mxfp4":
            e = mx_exponent(absmax)
            return Params({"scale": mx_scale(e)}, {"scale": e})
        glob = nvfp4_global_scale(group_absmax.amax() if self.tensor_absmax is None else self.tensor_absmax)
        scale = E4M3.round((absmax / _FP4_MAX) * glob)
        scale = torch.where(scale == 0, torch.full_like(scale, _ZERO_SCALE), scale)
        stored = {"scale": E4M3.encode(scale).to(torch.uint8), "global_scale": glob}
        return Params({"scale": scale / glob}, stored)

    def encode(self, w: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        # + 0.0 turns -0.0 into +0.0: compressed-tensors signs codes by torch.sign, which is +0 there
        return E2M1.encode(w / values["scale"] + 0.0)

    def decode(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        w = E2M1.decode(codes) * values["scale"]
        return w.to(torch.bfloat16).float() if self.kind == "nvfp4" else w

    def load_params(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> Params:
        rows, groups = shape[0], self.n_groups(shape[1])
        code = stored["scale"].reshape(rows, groups)
        if self.kind == "mxfp4":
            return Params({"scale": mx_scale(code)}, dict(stored))
        glob = stored["global_scale"].float().reshape(1)
        return Params({"scale": E4M3.decode(code.to(torch.int32)) / glob}, dict(stored))

    def param_nbytes(self, shape: tuple[int, int]) -> int:
        return shape[0] * self.n_groups(shape[1]) + (4 if self.kind == "nvfp4" else 0)
