"""bitsandbytes' 4-bit formats: NF4 and FP4 with a float32 absmax per block of ``block`` inputs.

Bit-compatible with ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on CPU
(bitsandbytes 0.50): same codebooks, the same 4-bit code for every weight, the same absmax, and so
the same decoded float32 weights. ``-dq`` is bnb's ``compress_statistics=True``: the absmax minus
its mean is stored as 8-bit codes of bnb's signed dynamic map, blockwise over 256 absmax values.

bnb quantizes the weights against the exact absmax and only then compresses it, so with ``-dq``
``fit`` also returns that exact absmax as ``values["encode_absmax"]``, which :meth:`encode` prefers;
decoding uses only ``values["absmax"]``, the decoded one. Without it codes would differ from bnb's.
bnb blocks run over the flattened tensor, ours over each row; the two agree when ``block`` divides
the row length.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ampq.formats.base import Format, Params, constant_on

# bitsandbytes.functional.get_4bit_type; the index in these lists is the 4-bit code bnb stores.
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# FP4 is e2m1 in bnb's bit order, divided by its max in float32 as bnb does (so 8/12 rounds alike).
# Code 8 is +0.0 as in bnb's codebook and vector CPU kernel (its scalar kernel, for rows not a
# multiple of 16, gives -0.0). bnb rounds small positive values to code 8, so it does occur.
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]

_DQ_BLOCK = 256  # bnb's blocksize for the absmax of the absmax
_LUT_SIZE = 65536  # bnb's CPU 8-bit quantizer looks codes up on a grid of this many points


def _codebook(kind: str) -> torch.Tensor:
    if kind == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    return torch.tensor(_FP4, dtype=torch.float32) / 12.0


@lru_cache(maxsize=None)
def _dynamic_map() -> torch.Tensor:
    """bnb's ``create_dynamic_map(signed=True)``, computed the same way so every float32 matches."""
    data = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()
    return torch.tensor(sorted(data), dtype=torch.float32)


@lru_cache(maxsize=None)
def _dynamic_lut() -> torch.Tensor:
    """bnb's CPU quantizer does not search the map: it rounds x to a 65536-point grid on [-1, 1]
    and reads the code chosen for that grid point, which is not always the nearest code to x."""
    code = _dynamic_map()
    midpoints = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    grid = (i + i) / (_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(midpoints, grid)  # count of midpoints strictly below the grid point


def _dq_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU ``quantize_blockwise(x, blocksize=256)`` for float32 ``x`` (1-D): uint8 codes and
    the float32 absmax of each 256-block."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, (-n) % _DQ_BLOCK)).reshape(-1, _DQ_BLOCK)
    scale = blocks.abs().amax(dim=1)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    y = (blocks * inv.unsqueeze(1)).clamp(-1.0, 1.0)
    # bnb fuses the last multiply-add into an fma; for every float32 in [0, 1] the unfused float32
    # steps truncate to the same grid point (checked exhaustively).
    idx = ((y + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).trunc().long()
    codes = _dynamic_lut()[idx]
    codes[scale == 0] = 0  # bnb writes code 0 for an all-zero block rather than divide by zero
    return codes.reshape(-1)[:n].to(torch.uint8), scale


def _dq_decode(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """bnb's ``dequantize_blockwise`` then ``+= offset``, in the same float32 steps."""
    per_code = scale.repeat_interleave(_DQ_BLOCK)[: codes.numel()]
    return constant_on(_dynamic_map(), codes.device)[codes.long()] * per_code + offset


class NormalFloatFormat(Format):
    bits = 4

    def __init__(self, kind: str, block: int, double_quant: bool, name: str):
        if kind not in ("nf4", "fp4"):
            raise ValueError(f"kind must be 'nf4' or 'fp4', not {kind!r}")
        if block < 1:
            raise ValueError(f"block must be positive, not {block}")
        self.kind, self.group_size, self.double_quant, self.name = kind, block, double_quant, name
        self.groupwise_params = not double_quant  # the 8-bit absmax blocks span many groups
        self.code = _codebook(kind)
        # bnb rounds on the sorted codebook, a value on a midpoint going to the lower entry, then
        # maps the sorted position back to the code (FP4's codes are not in value order).
        self._order = torch.argsort(self.code, stable=True)
        ordered = self.code[self._order]
        self._bounds = (ordered[:-1] + ordered[1:]) / 2

    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> Params:
        g = self.grouped(w.float())
        clip = torch.as_tensor(clip, dtype=torch.float32)
        if clip.dim() == 2:
            clip = clip.reshape(g.shape[0], g.shape[1])
        absmax = g.abs().amax(dim=2) * clip
        if not self.double_quant:
            return Params({"absmax": absmax}, {"absmax": absmax})
        flat = absmax.reshape(-1)
        offset = flat.mean()
        codes, scale = _dq_encode(flat - offset)
        stored = {"absmax_codes": codes, "absmax_scale": scale, "absmax_offset": offset.reshape(1)}
        decoded = _dq_decode(codes, scale, stored["absmax_offset"]).reshape(absmax.shape)
        return Params({"absmax": decoded, "encode_absmax": absmax}, stored)

    def encode(self, w: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        absmax = values.get("encode_absmax", values["absmax"])
        # bnb's exact arithmetic: multiply by a reciprocal (not divide), and a floor on the absmax
        # so an all-zero block scales to 0 rather than NaN.
        scaled = torch.clamp(w * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
        return self._order[torch.bucketize(scaled, self._bounds)].to(torch.int32)

    def decode(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return constant_on(self.code, codes.device)[codes.long()] * values["absmax"]

    def load_params(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> Params:
        rows, groups = shape[0], self.n_groups(shape[1])
        if not self.double_quant:
            return Params({"absmax": stored["absmax"].float().reshape(rows, groups)}, dict(stored))
        absmax = _dq_decode(stored["absmax_codes"], stored["absmax_scale"].float(), stored["absmax_offset"].float())
        return Params({"absmax": absmax.reshape(rows, groups)}, dict(stored))

    def param_nbytes(self, shape: tuple[int, int]) -> int:
        n = shape[0] * self.n_groups(shape[1])
        if not self.double_quant:
            return 4 * n
        return n + 4 * math.ceil(n / _DQ_BLOCK) + 4
