"""llama.cpp's non-linear 4-bit types as ampq formats: ``iq4_nl`` and ``iq4_xs``.

Both decode a 4-bit code through llama.cpp's 16-value codebook ``kvalues_iq4nl`` (int8 levels,
denser near zero) times a scale per 32 inputs:

======  ==========================================================  =====  ========
type    decoded weight                                              bytes  bits/wt
======  ==========================================================  =====  ========
IQ4_NL  d * kvalues[q], fp16 d per block of 32                      18     4.5
IQ4_XS  d * (ls - 32) * kvalues[q], fp16 d per 256, 6-bit ls per 32  136    4.25
======  ==========================================================  =====  ========

The scale of each 32 is searched as llama.cpp's ``quantize_row_iq4_nl_impl`` searches it: a fan of
15 inverse scales around the one that maps the largest weight to the codebook's end, each followed
by the weighted least-squares scale for the codes it gives, weighted by the inputs' importance
(mean x^2 from calibration) where given, else by x^2.
"""

from __future__ import annotations

import torch

from ampq.formats.base import constant_on
from ampq.formats.gguf_block import GgufBlockFormat, to_fp16
from ampq.formats.kquant_search import EPS
from ampq.formats.packing import pack_fields, unpack_fields

KVALUES = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32)
# a value exactly between two levels goes to the upper one, as llama.cpp's best_index_int8 does
_MIDPOINTS = (KVALUES[:-1] + KVALUES[1:]) / 2
NTRY = 7


def nearest_level(x: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(x, constant_on(_MIDPOINTS, x.device).to(x.dtype), right=True)


def codebook_scale(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The scale d per row of ``x`` minimizing sum w (x - d * kvalues[q])^2 over the fan of tries."""
    kv = KVALUES.to(x.dtype)
    peak = x.gather(1, x.abs().argmax(1, keepdim=True))[:, 0]
    zero = peak.abs() < EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    best_d = best = None
    for inv in [-kv[0] / peak] + [(t + kv[0]) / peak for t in range(-NTRY, NTRY + 1)]:
        q = kv[nearest_level(x * inv[:, None])]
        wq = w * q
        sumqx, sumq2 = (wq * x).sum(1), (wq * q).sum(1)
        d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), torch.zeros_like(sumq2))
        if best is None:
            best_d, best = d, d * sumqx
            continue
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        best_d, best = torch.where(better, d, best_d), torch.where(better, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(best_d), best_d)


class IQ4Format(GgufBlockFormat):
    bits = 4
    group_size = 32

    def __init__(self, name: str):
        super().__init__(name)
        self.block, self.type_size = (32, 18) if name == "iq4_nl" else (256, 136)
        self.groupwise_params = name == "iq4_nl"  # one fp16 scale per 32: groups fit one by one
        self.code = KVALUES

    def _weights(self, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        if importance is None:
            return x * x
        sigma2 = 2.0 * (x * x).sum(1, keepdim=True) / self.block
        return importance * torch.sqrt(sigma2 + x * x)

    def _search(self, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        n = x.shape[0]
        scales = codebook_scale(x.reshape(-1, 32), weights.reshape(-1, 32)).reshape(n, -1)
        if self.name == "iq4_nl":
            return {"d": to_fp16(scales[:, 0], "d")}
        # IQ4_XS: the scale of largest magnitude becomes -32 * d, the others 6-bit multiples of d
        peak = scales.gather(1, scales.abs().argmax(1, keepdim=True))[:, 0]
        d = to_fp16(-peak / 32, "d")
        df = d.double()
        inv = torch.where(df != 0, 1 / torch.where(df != 0, df, torch.ones_like(df)), torch.zeros_like(df))
        ls = torch.round(scales * inv[:, None]).clamp_(-32, 31) + 32
        return {"d": d, "sc": ls.to(torch.uint8)}

    def _values(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        d = parts["d"].float().reshape(-1, 1)
        if self.name == "iq4_nl":
            return {"scale": d}
        return {"scale": d * (parts["sc"].float() - 32)}

    def encode(self, w: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = values["scale"]
        live = scale != 0
        q = nearest_level(w / torch.where(live, scale, torch.ones_like(scale)))
        return torch.where(live, q, torch.zeros_like(q)).to(torch.int32)

    def decode(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return constant_on(self.code, codes.device)[codes.long()] * values["scale"]

    def _to_blocks(self, codes: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        d = parts["d"].to(torch.float16).reshape(-1, 1).view(torch.uint8)
        qs = pack_fields(codes, 16, 4)
        if self.name == "iq4_nl":
            return torch.cat([d, qs], dim=1)
        ls = parts["sc"].to(torch.int32)
        return torch.cat([d, pack_fields(ls >> 4, 1, 2), pack_fields(ls & 0xF, 1, 4), qs], dim=1)

    def _from_blocks(self, b: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = b[:, 0:2].contiguous().view(torch.float16).reshape(-1)
        if self.name == "iq4_nl":
            return unpack_fields(b[:, 2:], 16, 4), {"d": d}
        ls = unpack_fields(b[:, 4:8], 1, 4) | (unpack_fields(b[:, 2:4], 1, 2) << 4)
        return unpack_fields(b[:, 8:], 16, 4), {"d": d, "sc": ls.to(torch.uint8)}
