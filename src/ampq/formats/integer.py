"""k-bit integer formats, 2 <= k <= 8.

Asymmetric (the default): w = min + scale * q with q in [0, 2^k - 1], fp16 scale and fp16 min per
group; this is GGUF's Q4_1 layout, so ``int4-g32`` reproduces a Q4_1 tensor exactly.
Symmetric (``-sym``): w = scale * (q - 2^(k-1)) with scale = absmax / (2^(k-1) - 1), fp16 scale only.
Zero point (``-zp``): w = scale * (q - z) with an integer z per group (uint8) and an fp16 scale: the
layout of GPTQ, AWQ and compressed-tensors' asymmetric schemes, so their checkpoints load exactly
and export back exactly. Decoding keeps the asymmetric form with min = -scale * z, which float32
holds exactly (an 11-bit scale times an 8-bit integer), so every kernel of ``-g`` formats runs it.
"""

from __future__ import annotations

import torch

from ampq.formats.base import Format, Params, to_fp16 as _to_fp16


class IntegerFormat(Format):
    def __init__(self, bits: int, group_size: int | None, symmetric: bool, name: str, zero_point: bool = False):
        if symmetric and zero_point:
            raise ValueError("a format is symmetric or has zero points, not both")
        self.bits, self.group_size, self.symmetric, self.name = bits, group_size, symmetric, name
        self.zero_point = zero_point
        self.qmax = (1 << bits) - 1
        self.half = 1 << (bits - 1)

    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> Params:
        g = self.grouped(w.float())
        clip = torch.as_tensor(clip, dtype=torch.float32)
        if clip.dim() == 2:
            clip = clip.reshape(g.shape[0], g.shape[1])
        if self.symmetric:
            absmax = g.abs().amax(dim=2) * clip
            scale = _to_fp16(absmax / (self.half - 1), "scale")
            return Params({"scale": scale.float()}, {"scale": scale})
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        center, radius = (hi + lo) / 2, (hi - lo) / 2 * clip
        lo, hi = center - radius, center + radius
        if self.zero_point:
            # the range must hold 0 for the zero to be a code (GPTQ and AWQ widen it the same way)
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = _to_fp16((hi - lo) / self.qmax, "scale")
            s = scale.float()
            zero = torch.where(s > 0, torch.round(-lo / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(s))
            zero = zero.clamp(0, self.qmax).to(torch.uint8)
            return Params(self._zp_values(scale, zero), {"scale": scale, "zero": zero})
        scale = _to_fp16((hi - lo) / self.qmax, "scale")
        minimum = _to_fp16(lo, "minimum")
        return Params({"scale": scale.float(), "min": minimum.float()}, {"scale": scale, "min": minimum})

    def encode(self, w: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = values["scale"]
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        if self.symmetric:
            q = torch.round(w * inv) + self.half
        else:
            q = torch.round((w - values["min"]) * inv)
        return q.clamp_(0, self.qmax).to(torch.int32)

    def decode(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.symmetric:
            return (codes - self.half).float() * values["scale"]
        return codes.float() * values["scale"] + values["min"]

    def affine_terms(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(offset, inverse scale, scale, lowest, highest) such that decode(encode(w)) equals
        clamp(round((w - offset) * inverse), lowest, highest) * scale + offset, bit for bit: the one
        expression every integer format shares, so GPTQ can round many of them in one operation."""
        scale = values["scale"]
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        if self.symmetric:
            return torch.zeros_like(scale), inv, scale, -self.half, self.qmax - self.half
        return values["min"], inv, scale, 0, self.qmax

    @staticmethod
    def _zp_values(scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
        s = scale.float()
        return {"scale": s, "min": -s * zero.float()}

    def load_params(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> Params:
        if self.zero_point:
            return Params(self._zp_values(stored["scale"], stored["zero"]), dict(stored))
        values = {k: v.float() for k, v in stored.items()}
        return Params(values, dict(stored))

    def param_nbytes(self, shape: tuple[int, int]) -> int:
        rows = 1 if self.group_size == 0 else shape[0]
        per_group = 2 if self.symmetric else 3 if self.zero_point else 4
        return rows * self.n_groups(shape[1]) * per_group
