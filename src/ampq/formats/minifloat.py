"""Minifloat formats ExMy: 1 sign bit, E exponent bits, M mantissa bits, one scale per group.

Codes are the format's real bit patterns (sign | exponent | mantissa), so an ``fp8-e4m3`` code is
the byte ``x.to(torch.float8_e4m3fn).view(torch.uint8)`` would give. Rounding is done arithmetically
in float32 rather than through torch's float8 casts so that any ExMy works, and it agrees with those
casts bit for bit. A tie goes to the even significand (with no mantissa bits, M = 0, that is the
larger of the two). Where the casts disagree with each other out of range (torch 2.13 on CPU clamps
e4m3fn to +-448, even +-inf, but lets e5m2 overflow to +-inf from 61440 on), ``saturate`` picks one
behaviour for every format.

Special values (``special``):
  'ieee'  the top exponent holds inf and NaN (like E5M2, max 57344);
  'fn'    only S.1111.111 is NaN (like float8_e4m3fn, max 448);
  'none'  every code is finite (the OCP MX FP6 E3M2 / E2M3 and FP4 E2M1, max 28, 7.5, 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ampq.formats.base import Format, Params, constant_on

SPECIALS = ("ieee", "fn", "none")


def _pow2(e: torch.Tensor) -> torch.Tensor:
    # Built from the bits so it is exact; exp2/ldexp give no such promise.
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


@dataclass(frozen=True)
class MinifloatSpec:
    exp_bits: int
    man_bits: int
    bias: int | None = None
    special: str | None = None
    saturate: bool = True  # out of range: clamp to the max finite value instead of inf / NaN

    def __post_init__(self):
        e, m = self.exp_bits, self.man_bits
        if e < 1 or m < 0 or 1 + e + m > 8:
            raise ValueError(f"E{e}M{m}: minifloats need 1 to 7 exponent bits and at most 8 bits in all")
        if self.bias is None:
            object.__setattr__(self, "bias", (1 << (e - 1)) - 1)
        if self.special is None:
            object.__setattr__(self, "special", {(4, 3): "fn", (5, 2): "ieee"}.get((e, m), "none"))
        if self.special not in SPECIALS:
            raise ValueError(f"special must be one of {SPECIALS}, not {self.special!r}")
        if self.special == "none" and not self.saturate:
            raise ValueError(f"E{e}M{m} with special='none' has no inf or NaN to overflow to; it must saturate")
        if self.special == "ieee" and e < 2:
            raise ValueError(f"E{e}M{m}: special='ieee' needs at least 2 exponent bits")
        if self.emin - m < -126 or self.emax > 127:
            raise ValueError(f"E{e}M{m} with bias {self.bias} does not fit in float32")
        if not self.max_finite > 0:
            raise ValueError(f"E{e}M{m} with special={self.special!r} has no positive finite value")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the lowest binade; subnormals share its quantum."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return (1 << self.exp_bits) - (2 if self.special == "ieee" else 1) - self.bias

    def _decode_one(self, code: int) -> float:
        e, m = self.exp_bits, self.man_bits
        sign = -1.0 if code >> (e + m) else 1.0
        ef, mf = (code >> m) & ((1 << e) - 1), code & ((1 << m) - 1)
        top = ef == (1 << e) - 1
        if self.special == "ieee" and top:
            return sign * math.inf if mf == 0 else math.nan
        if self.special == "fn" and top and mf == (1 << m) - 1:
            return math.nan
        if ef == 0:
            return sign * math.ldexp(mf, self.emin - m)
        return sign * math.ldexp((1 << m) + mf, ef - self.bias - m)

    @cached_property
    def table(self) -> torch.Tensor:
        """float32 value of every code, indexed by code."""
        return torch.tensor([self._decode_one(c) for c in range(1 << self.bits)], dtype=torch.float32)

    @cached_property
    def max_finite(self) -> float:
        t = self.table
        return float(t[torch.isfinite(t)].max())

    def _top_code(self, pred) -> int | None:
        # The highest match: torch writes NaN as S.1111.111 in both float8s.
        half = self.table[: 1 << (self.bits - 1)]
        hits = pred(half).nonzero()
        return int(hits[-1]) if len(hits) else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """int32 codes of ``x``: nearest value, ties to even, subnormals included."""
        x = x.float()
        m = self.man_bits
        a = x.abs()
        if self.saturate:
            a = a.clamp(max=self.max_finite)  # inf too, as torch's e4m3fn cast does
        finite = torch.isfinite(a)
        a = torch.where(finite, a, torch.zeros_like(a))
        # frexp: a = f * 2^k with f in [0.5, 1), so the binade is k - 1; subnormals use the lowest.
        binade = (torch.frexp(a)[1] - 1).clamp(self.emin, self.emax)
        quantum = _pow2(binade - m)
        n = torch.round(a / quantum)  # exact division by a power of two; round is half to even
        overflow = ~finite | (n * quantum > self.max_finite)
        n = torch.where(overflow, torch.zeros_like(n), n).to(torch.int32)  # its code is replaced below
        carry = n >> (m + 1)  # rounded up into the next binade: 1.111 -> 10.000
        n, binade = n >> carry, binade + carry
        ef = torch.where(n >= (1 << m), binade + self.bias, torch.zeros_like(n))
        codes = (ef << m) | (n & ((1 << m) - 1))
        if not self.saturate:
            over = self._top_code(torch.isinf if self.special == "ieee" else torch.isnan)
            codes = torch.where(overflow, torch.full_like(codes, over), codes)
        nan = torch.isnan(x)
        if bool(nan.any()):
            nan_code = self._top_code(torch.isnan)
            if nan_code is None:
                raise ValueError(f"NaN has no code in E{self.exp_bits}M{m} with special='none'")
            codes = torch.where(nan, torch.full_like(codes, nan_code), codes)
        return codes | (torch.signbit(x).to(torch.int32) << (self.bits - 1))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return constant_on(self.table, codes.device)[codes.long()]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the nearest representable value, float32."""
        return self.decode(self.encode(x))


class MinifloatFormat(Format):
    """Scale = absmax * clip / max_finite per group: float32 for a whole tensor, bfloat16 for channels
    and groups (fp16 would not do: absmax / 57344 for e5m2 underflows it)."""

    def __init__(self, exp_bits: int, man_bits: int, group_size: int | None, name: str, *,
                 bias: int | None = None, special: str | None = None, saturate: bool = True):
        self.spec = MinifloatSpec(exp_bits, man_bits, bias, special, saturate)
        self.bits, self.group_size, self.name = self.spec.bits, group_size, name
        self.scale_dtype = torch.float32 if group_size == 0 else torch.bfloat16

    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> Params:
        absmax, clip = self.group_absmax(w, clip)
        # Rounding the scale down to bf16 pushes the largest weights past max_finite by at most a
        # part in 2^9, less than half a quantum for any M <= 7: they round (or saturate) to the max.
        scale = (absmax * clip / self.spec.max_finite).to(self.scale_dtype)
        return Params({"scale": scale.float()}, {"scale": scale})

    def encode(self, w: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = values["scale"]
        # A zero scale (an all-zero group) must give +0, not 0/0 = NaN or -0.
        y = torch.where(scale > 0, w / scale, torch.zeros_like(w))
        return self.spec.encode(y)

    def decode(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.spec.decode(codes) * values["scale"]

    def load_params(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> Params:
        return Params({"scale": stored["scale"].float()}, dict(stored))

    def param_nbytes(self, shape: tuple[int, int]) -> int:
        rows = 1 if self.group_size == 0 else shape[0]
        return rows * self.n_groups(shape[1]) * self.scale_dtype.itemsize
