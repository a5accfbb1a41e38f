"""Minifloat formats: element rounding against torch's float8 casts and the OCP MX value sets,
then scales, storage and sizes of the named formats."""

from __future__ import annotations

import math

import pytest
import torch

from ampq.formats import get_format
from ampq.formats.minifloat import MinifloatSpec

E4M3 = MinifloatSpec(4, 3)
E5M2 = MinifloatSpec(5, 2)
E5M2_OVERFLOW = MinifloatSpec(5, 2, saturate=False)
E5M2_FIRST_INF = 61440.0  # halfway from 57344 to the next (absent) value 65536: torch rounds it to inf

# The OCP MX v1.0 element formats, positive half, by code (code 0 is +0).
OCP_E3M2 = [0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875,
            1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28]
OCP_E2M3 = [0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1.125, 1.25, 1.375, 1.5, 1.625,
            1.75, 1.875, 2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5]
OCP_E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]

NAMES = ["fp8-e4m3", "fp8-e4m3-ch", "fp8-e5m2-ch", "e3m2-g32", "e2m3-g32", "e2m1-g32"]


def f32(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise equal float32 (so -0 != +0), or both NaN."""
    return (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())


def hard_cases(spec: MinifloatSpec, hi: float, stride: int = 1021, n_rand: int = 20000) -> torch.Tensor:
    """float32 values in [-hi, hi]: a sweep over every float32 binade up to ``hi`` (float32
    subnormals and the format's subnormals included), every representable value, every exact tie
    between neighbours, a few float32 ulps either side of each, zeros and random magnitudes."""
    top = torch.tensor(hi, dtype=torch.float32).view(torch.int32).item()
    sweep = f32(torch.arange(0, top, stride, dtype=torch.int64))  # odd stride: low bits vary too
    t = spec.table.double()
    vals = t[torch.isfinite(t) & (t >= 0)].unique()
    mids = ((vals[:-1] + vals[1:]) / 2).float()  # M + 1 bits: exact in float32
    near = torch.cat([mids, vals.float()]).view(torch.int32)[:, None] + torch.arange(-3, 4, dtype=torch.int32)
    near = f32(near.clamp(min=0).reshape(-1))
    gen = torch.Generator().manual_seed(0)
    rand = torch.cat([torch.randn(n_rand, generator=gen) * 10.0 ** k for k in range(-9, 6)]).abs()
    x = torch.cat([sweep, near, rand, mids])
    x = x[x <= hi]
    return torch.cat([x, -x, torch.tensor([0.0, -0.0])])


# ---- 1. element rounding equals torch's float8 casts ------------------------------------------------

@pytest.mark.parametrize("spec, dtype, hi", [
    (E4M3, torch.float8_e4m3fn, 448.0),
    (E5M2, torch.float8_e5m2, 61439.996),  # the largest float32 below E5M2_FIRST_INF
    (E5M2_OVERFLOW, torch.float8_e5m2, 3.0e38),
])
def test_rounding_matches_torch_float8(spec, dtype, hi):
    x = hard_cases(spec, hi)
    codes = spec.encode(x)
    expected = x.to(dtype)
    mismatch = codes != expected.view(torch.uint8).to(torch.int32)
    assert not mismatch.any(), f"{int(mismatch.sum())} codes differ, first at x={x[mismatch][:5].tolist()}"
    assert same(spec.decode(codes), expected.float()).all()
    assert spec.encode(x).dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) < 256


def test_out_of_range_follows_torch():
    # torch 2.13 (CPU) clamps e4m3fn to +-448, infinities included; E4M3 saturates the same way.
    big = torch.tensor([449.0, 463.9, 464.0, 480.0, 1e6, 3e38, math.inf])
    x = torch.cat([big, -big])
    assert torch.equal(E4M3.encode(x), x.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32))
    assert torch.equal(E4M3.round(x).abs(), torch.full_like(x, 448.0))
    # torch's e5m2 cast overflows to inf from 61440 on: non-saturating E5M2 does too (checked above
    # over the whole float32 range); the saturating default clamps to 57344 instead.
    x = torch.tensor([57344.0, 61439.996, E5M2_FIRST_INF, 1e10, math.inf, -math.inf])
    assert E5M2_OVERFLOW.round(x).tolist() == [57344.0, 57344.0, math.inf, math.inf, math.inf, -math.inf]
    assert E5M2.round(x).tolist() == [57344.0] * 5 + [-57344.0]
    # Non-saturating fn overflows to NaN (there is no inf); 464 is a tie and goes to the even 448.
    fn = MinifloatSpec(4, 3, saturate=False)
    assert fn.encode(torch.tensor([464.0, 480.0, -1e9])).tolist() == [0x7E, 0x7F, 0xFF]
    nan = torch.tensor([math.nan])
    assert E4M3.encode(nan).item() == nan.to(torch.float8_e4m3fn).view(torch.uint8).item()
    assert E5M2.encode(nan).item() == nan.to(torch.float8_e5m2).view(torch.uint8).item()


def test_fp8_e4m3_format_codes_are_torch_bytes():
    fmt = get_format("fp8-e4m3")
    x = hard_cases(E4M3, 448.0)
    codes = fmt.encode(x, {"scale": torch.ones(1)})
    assert torch.equal(codes, x.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32))


def test_special_values_by_name():
    assert (E4M3.special, E4M3.max_finite, E4M3.table.isnan().sum().item()) == ("fn", 448.0, 2)
    assert (E5M2.special, E5M2.max_finite, E5M2.table.isinf().sum().item()) == ("ieee", 57344.0, 2)
    assert torch.equal(E4M3.table[:0x7F], torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float())
    assert same(E5M2.table, torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2).float()).all()
    with pytest.raises(ValueError):
        MinifloatSpec(2, 1, saturate=False)  # no inf or NaN to overflow to


# ---- 2. OCP MX FP6 / FP4 value sets and nearest-even rounding ---------------------------------------

def brute_force_codes(spec: MinifloatSpec, x: torch.Tensor) -> torch.Tensor:
    """Nearest value by exhaustive search; a tie goes to the even code; signs ride in the top bit."""
    half = 1 << (spec.bits - 1)
    vals = spec.table[:half].double()
    vals[~vals.isfinite()] = math.inf  # never nearest
    dist = (x.double().abs()[:, None] - vals[None, :]).abs()
    nearest = dist == dist.min(dim=1, keepdim=True).values
    even = nearest & (torch.arange(half) % 2 == 0)
    pick = torch.where(even.any(dim=1), even.int().argmax(dim=1), nearest.int().argmax(dim=1))
    return pick.to(torch.int32) | (torch.signbit(x).to(torch.int32) * half)


@pytest.mark.parametrize("name, ocp, max_finite", [
    ("e3m2-g32", OCP_E3M2, 28.0), ("e2m3-g32", OCP_E2M3, 7.5), ("e2m1-g32", OCP_E2M1, 6.0),
])
def test_ocp_mx_value_sets(name, ocp, max_finite):
    spec = get_format(name).spec
    assert spec.special == "none" and spec.max_finite == max_finite
    ocp = torch.tensor(ocp, dtype=torch.float32)
    assert torch.equal(spec.table, torch.cat([ocp, -ocp]))  # code order is the bit pattern
    assert spec.table[len(ocp)].item() == 0 and math.copysign(1, spec.table[len(ocp)].item()) == -1
    x = hard_cases(spec, 1.5 * max_finite, stride=10007)  # beyond the max: saturates to it
    assert torch.equal(spec.encode(x), brute_force_codes(spec, x))
    assert torch.equal(spec.round(x), spec.table[brute_force_codes(spec, x).long()])


@pytest.mark.parametrize("e, m", [(e, m) for e in range(1, 8) for m in range(1, 8 - e)])
def test_any_exmy_rounds_to_nearest_even(e, m):
    spec = MinifloatSpec(e, m)
    assert spec.bits == 1 + e + m and len(spec.table) == 1 << spec.bits
    pos = spec.table[: 1 << (spec.bits - 1)]
    pos = pos[pos.isfinite()]
    assert (pos.diff() > 0).all()  # codes of one sign increase with the value
    x = hard_cases(spec, 1.25 * spec.max_finite, stride=100_003, n_rand=500)
    assert torch.equal(spec.encode(x), brute_force_codes(spec, x))


# ---- 3. scales, storage, sizes ------------------------------------------------------------------------

def weights(out: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Rows at magnitudes 1e-6 .. 1e3 (e5m2's tiny scales underflow fp16), with outliers."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen)
    w *= 10.0 ** torch.arange(-6, 4).repeat(out // 10 + 1)[:out, None].float()
    w[::3, 7] *= 20
    return w


def stored_nbytes(stored: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(30, 128), (20, 100)])  # 100 inputs: a partial last group of 32
def test_round_trip_and_error_bound(name, shape):
    fmt, spec = get_format(name), get_format(name).spec
    w = weights(*shape)
    stored = fmt.quantize(w)
    w_hat = fmt.dequantize(stored, shape)
    codes, params = fmt.quantize_codes(w)
    assert torch.equal(w_hat, fmt.dequantize_codes(codes, params.values))
    assert torch.equal(w_hat, fmt.fake_quantize(w))
    assert stored_nbytes(stored) == fmt.nbytes(shape)
    assert torch.equal(params.values["scale"], params.stored["scale"].float())  # encode saw the stored scale
    assert params.stored["scale"].dtype == (torch.float32 if fmt.group_size == 0 else torch.bfloat16)

    scale = fmt.expand(params.values, shape)["scale"]
    assert (scale > 0).all()
    y = (w / scale).double().abs()
    binade = torch.floor(torch.log2(y)).clamp(spec.emin, spec.emax)
    bound = torch.exp2(binade - spec.man_bits - 1) * scale.double()  # half a quantum, times the scale
    err = (w.double() - w_hat.double()).abs()
    assert (err <= bound * (1 + 2**-20)).all(), f"worst excess {(err / bound).max().item()}"


def test_bits_per_weight_and_param_bytes():
    assert get_format("fp8-e4m3-ch").bits_per_weight((4096, 4096)) == 8 + 16 / 4096
    assert get_format("fp8-e4m3").nbytes((64, 64)) == 64 * 64 + 4
    assert get_format("e2m1-g32").nbytes((8, 100)) == 8 * 100 // 2 + 8 * 4 * 2
    assert get_format("e3m2-g32").nbytes((8, 100)) == 8 * 100 * 6 // 8 + 8 * 4 * 2


def test_partial_last_group_scale():
    fmt = get_format("e2m1-g32")
    w = weights(10, 100)
    params = fmt.fit(w)
    assert params.stored["scale"].shape == (10, 4)
    expected = (w[:, 96:].abs().amax(dim=1) / 6.0).to(torch.bfloat16)
    assert torch.equal(params.stored["scale"][:, 3], expected)
    assert fmt.fake_quantize(w).shape == (10, 100)


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_group_gives_plus_zero(name):
    fmt = get_format(name)
    w = weights(4, 64)
    w[1] = 0.0
    w[2, :32] = -0.0
    if fmt.group_size == 0:
        w.zero_()
    codes, params = fmt.quantize_codes(w)
    w_hat = fmt.dequantize_codes(codes, params.values)
    assert not w_hat.isnan().any()
    assert (codes[1] == 0).all() and (w_hat[1] == 0).all()
    if fmt.group_size:
        assert (codes[2, :32] == 0).all()


def test_clip_saturates_to_max():
    fmt = get_format("fp8-e4m3-ch")
    w = weights(6, 64)
    clip = torch.full((6, 1), 0.5)
    params = fmt.fit(w, clip)
    scale = params.values["scale"]
    w_hat = fmt.dequantize_codes(fmt.quantize_codes(w, clip)[0], params.values)
    big = w.abs() > 0.51 * w.abs().amax(dim=1, keepdim=True)
    assert big.any()
    assert torch.equal(w_hat.abs()[big], (448.0 * scale).expand_as(w)[big])
    assert torch.equal(fmt.fit(w, 0.5).values["scale"], scale)
