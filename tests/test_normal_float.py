"""NF4 / FP4 against bitsandbytes on CPU: same codes, same absmax, bit-identical decoded weights."""

from __future__ import annotations

import pytest
import torch

from ampq.formats import get_format
from ampq.formats.normal_float import NormalFloatFormat, _codebook, _dq_encode, _dynamic_map

try:
    import bitsandbytes.functional as bnbf
except ImportError:  # the format itself never needs bitsandbytes
    bnbf = None
needs_bnb = pytest.mark.skipif(bnbf is None, reason="needs bitsandbytes")

KINDS = ["nf4", "fp4"]
# (out, in, block), in % block == 0 so bnb's flat blocks are our per-row blocks
SHAPES = [(64, 576, 64), (128, 256, 128), (48, 512, 32)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _weights(out: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of very different scale, so the absmax (and its double quantization) spans a range
    w = torch.randn(out, cols, generator=g) * torch.rand(out, 1, generator=g).pow(3) * 4
    w[out // 3] = 0.0
    return w


def _bnb_codes(packed: torch.Tensor) -> torch.Tensor:
    # bnb puts the first of each pair in the high nibble
    p = packed.reshape(-1).to(torch.int32)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)


def _stored_nbytes(stored: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())


@needs_bnb
def test_codebooks_are_bnbs():
    for kind in KINDS:
        assert torch.equal(_bits(_codebook(kind)), _bits(bnbf.get_4bit_type(kind, device="cpu")))
    assert torch.equal(_bits(_dynamic_map()), _bits(bnbf.create_dynamic_map(signed=True)))


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("out,cols,block", SHAPES)
def test_bit_exact_with_bitsandbytes(kind, dq, out, cols, block):
    w = _weights(out, cols, seed=out + cols + block)
    fmt = NormalFloatFormat(kind, block, dq, f"{kind}-b{block}{'-dq' if dq else ''}")

    packed, state = bnbf.quantize_4bit(w, blocksize=block, quant_type=kind, compress_statistics=dq)
    expected = bnbf.dequantize_4bit(packed, state)
    if dq:
        bnb_absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        bnb_absmax = state.absmax

    codes, params = fmt.quantize_codes(w)
    got = fmt.dequantize(fmt.quantize(w), (out, cols))

    assert torch.equal(codes.reshape(-1), _bnb_codes(packed))
    assert torch.equal(_bits(params.values["absmax"].reshape(-1)), _bits(bnb_absmax))
    assert torch.equal(got, expected)
    assert torch.equal(_bits(got), _bits(expected))  # torch.equal ignores the sign of zero
    if dq:
        assert torch.equal(params.stored["absmax_codes"], state.absmax)
        assert torch.equal(_bits(params.stored["absmax_scale"]), _bits(state.state2.absmax))
        assert torch.equal(_bits(params.stored["absmax_offset"]), _bits(state.offset.reshape(1)))


@needs_bnb
@pytest.mark.parametrize("kind", KINDS)
def test_values_on_the_midpoints_round_as_bnb(kind):
    # weights within a few ulps of the midpoints between codes, where ties, and multiplying by
    # 1/absmax rather than dividing by it, decide the code
    fmt = NormalFloatFormat(kind, 256, False, kind)
    code = fmt.code.sort().values
    mids = (code[:-1] + code[1:]) / 2
    rows = []
    for a in [0.3, 0.7, 1.1, 3.0, 5.9, 0.0123, 17.0, 1e-3]:
        a = torch.tensor(a, dtype=torch.float32)
        near = torch.cat([mids * a, mids / (1.0 / a)])
        for _ in range(3):
            near = torch.cat([near, torch.nextafter(near, near + 1), torch.nextafter(near, near - 1)]).unique()
        vals = torch.cat([a.reshape(1), near])
        rows.append(torch.cat([vals, vals[:1].expand(256 - vals.numel())]))
    w = torch.stack(rows)
    packed, state = bnbf.quantize_4bit(w, blocksize=256, quant_type=kind)
    codes, _ = fmt.quantize_codes(w)
    assert torch.equal(codes.reshape(-1), _bnb_codes(packed))


@needs_bnb
def test_absmax_quantizer_is_bnbs():
    # bnb's CPU 8-bit quantizer reads codes off a 65536-point grid, not the nearest code: sweep
    # every grid cell so a plain nearest-code rounding would fail here.
    sweep = torch.linspace(-1, 1, 256 * 2048).reshape(-1, 256)
    sweep[:, 0] = 1.0  # absmax 1 per block, so the swept values are the normalized ones
    g = torch.Generator().manual_seed(1)
    cases = [
        sweep.reshape(-1),
        torch.randn(256 * 500 + 77, generator=g) * 3,
        torch.cat([torch.zeros(256), torch.rand(300, generator=g) - 0.5]),  # an all-zero block
    ]
    for x in cases:
        codes, scale = _dq_encode(x)
        expected_codes, state = bnbf.quantize_blockwise(x, blocksize=256)
        assert torch.equal(codes, expected_codes)
        assert torch.equal(_bits(scale), _bits(state.absmax))


@pytest.mark.parametrize("name", ["nf4-b64", "nf4-b64-dq", "fp4-b64", "fp4-b128-dq"])
def test_round_trip_error_and_size(name):
    fmt = get_format(name)
    shape = (96, 768)
    w = _weights(*shape, seed=7)

    codes, params = fmt.quantize_codes(w)
    direct = fmt.dequantize_codes(codes, params.values)
    stored = fmt.quantize(w)
    assert torch.equal(fmt.dequantize(stored, shape), direct)  # storage loses nothing

    sorted_code = fmt.code.sort().values
    half_gap = (sorted_code[1:] - sorted_code[:-1]).max() / 2
    exact = fmt.expand({"a": params.values.get("encode_absmax", params.values["absmax"])}, shape)["a"]
    decoded = fmt.expand({"a": params.values["absmax"]}, shape)["a"]
    # rounding error against the exact absmax, plus what compressing the absmax moved the grid
    bound = half_gap * exact + (decoded - exact).abs() + 1e-6 * (exact + decoded.abs())
    assert bool(((w - direct).abs() <= bound).all())
    assert not torch.isnan(direct).any()
    assert torch.equal(direct[shape[0] // 3], torch.zeros(shape[1]))  # the zero row stays zero

    assert fmt.nbytes(shape) == _stored_nbytes(stored)
    assert stored["codes"].dtype == torch.uint8


def test_bits_per_weight():
    shape = (4096, 4096)
    assert get_format("nf4-b64").bits_per_weight(shape) == 4.5
    assert get_format("nf4-b64-dq").bits_per_weight(shape) == pytest.approx(4.127, abs=5e-4)
    assert get_format("nf4-b64").bits == 4
    # exact sizes on a small tensor: codes, uint8 absmax codes, fp32 scale per 256, fp32 offset
    small = (10, 640)  # 100 blocks -> one 256-block of absmax codes
    fmt = get_format("nf4-b64-dq")
    assert fmt.nbytes(small) == 3200 + 100 + 4 + 4
    assert fmt.nbytes(small) == _stored_nbytes(fmt.quantize(_weights(*small)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_partial_last_block(kind, dq):
    shape = (8, 100)  # blocks of 64 + a partial block of 36 per row
    fmt = NormalFloatFormat(kind, 64, dq, "partial")
    w = _weights(*shape, seed=3)

    codes, params = fmt.quantize_codes(w)
    assert params.values["absmax"].shape == (8, 2)
    direct = fmt.dequantize_codes(codes, params.values)
    stored = fmt.quantize(w)
    assert direct.shape == shape
    assert torch.equal(fmt.dequantize(stored, shape), direct)
    assert fmt.nbytes(shape) == _stored_nbytes(stored)
    exact = params.values.get("encode_absmax", params.values["absmax"])
    assert torch.equal(exact[:, 1], w[:, 64:].abs().amax(dim=1))  # padding leaves the absmax alone

    if not dq and bnbf is not None:
        # one row alone is one bnb tensor with the same two blocks
        for r in range(shape[0]):
            packed, state = bnbf.quantize_4bit(w[r : r + 1].clone(), blocksize=64, quant_type=kind)
            assert torch.equal(codes[r], _bnb_codes(packed))
            # by value: on rows that are not a multiple of 16 bnb's scalar kernel decodes FP4 code 8
            # as -0.0 where its vector kernel and codebook give +0.0
            assert torch.equal(direct[r : r + 1], bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("name", ["nf4-b64", "nf4-b64-dq", "fp4-b64", "fp4-b128-dq"])
def test_all_zero_weights(name):
    fmt = get_format(name)
    w = torch.zeros(4, 256)
    out = fmt.dequantize(fmt.quantize(w), w.shape)
    assert torch.equal(out, w)


def test_clip_scales_absmax_and_clamps():
    fmt = get_format("nf4-b64")
    w = _weights(16, 256, seed=5)
    full = fmt.fit(w).values["absmax"]
    clipped = fmt.fit(w, clip=0.5).values["absmax"]
    assert torch.equal(clipped, full * 0.5)
    per_block = torch.full((16, 4), 0.5)
    assert torch.equal(fmt.fake_quantize(w, clip=per_block), fmt.fake_quantize(w, clip=0.5))
    out = fmt.fake_quantize(w, clip=0.5)
    limit = fmt.expand({"a": clipped}, w.shape)["a"]
    assert bool((out.abs() <= limit).all())
    assert bool((out.abs() == limit)[w.abs() >= limit].all())  # beyond the clip: the end codes


@pytest.mark.parametrize("fmt", ["nf4-b64-dq", "fp4-b64", "fp8-e4m3-ch", "e2m1-g32"])
def test_decoding_follows_the_codes_device(fmt):
    # the decode tables live on the CPU and are copied once to the codes' device. A CPU table
    # indexed by CUDA codes failed on a GPU (found by benchmarks/kernel_speed.py --gpu); "meta" tolerates
    # the mismatch, so here the copy-once cache is what is checked, and that decoding stays there
    from ampq.formats.base import constant_on
    from ampq.pipeline.blockwise import quantize_linear

    q = quantize_linear("l", torch.nn.Linear(128, 32), fmt).to("meta")
    w = q.dequantize(torch.float32)
    assert w.device.type == "meta" and w.shape == (32, 128)
    table = torch.arange(4.0)
    assert constant_on(table, torch.device("cpu")) is table
    assert constant_on(table, torch.device("meta")) is constant_on(table, torch.device("meta"))
