import pytest
import torch

from ampq.formats import get_format
from ampq.formats.packing import pack_bits, packed_nbytes, unpack_bits

torch.manual_seed(0)
INT_FORMATS = [f"int{b}-{g}{s}" for b in (2, 3, 4, 5, 6, 8) for g in ("g32", "g64", "g128", "ch") for s in ("", "-sym", "-zp")]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4097])
def test_packing_round_trip_without_padding(bits, n):
    codes = torch.randint(0, 1 << bits, (n,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8 == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes.int())


def test_int4_packs_two_per_byte_low_nibble_first():
    assert pack_bits(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]


def _bound(fmt, w, params):
    """Largest error round to nearest may make: half a step, plus what fp16 rounding of the
    parameters may shift the grid by. With integer zero points the grid is shifted by up to half a
    step to put 0 on it, so the far end may clip by another half step."""
    v = fmt.expand(params.values, w.shape)
    s = v["scale"]
    span = s * fmt.qmax if not fmt.symmetric else s * fmt.half
    return (1.0 if fmt.zero_point else 0.5) * s + 2 ** -10 * (span + (v["min"].abs() if "min" in v else 0)) + 1e-7


@pytest.mark.parametrize("name", INT_FORMATS)
@pytest.mark.parametrize("shape", [(48, 256), (17, 200)])
def test_round_trip_bounds_and_accounting(name, shape):
    fmt = get_format(name)
    w = torch.randn(shape) * torch.logspace(-3, 0, shape[0])[:, None]
    codes, params = fmt.quantize_codes(w)
    assert codes.min() >= 0 and codes.max() < (1 << fmt.bits)
    deq = fmt.dequantize_codes(codes, params.values)
    stored = fmt.quantize(w)
    assert torch.equal(fmt.dequantize(stored, shape), deq)  # storage loses nothing
    assert sum(t.numel() * t.element_size() for t in stored.values()) == fmt.nbytes(shape)
    err = (w - deq).abs()
    assert bool((err <= _bound(fmt, w, params)).all()), float((err - _bound(fmt, w, params)).max())


def test_bits_per_weight_of_usual_formats():
    shape = (4096, 4096)
    assert get_format("int4-g128").bits_per_weight(shape) == 4.25
    assert get_format("int4-g128-sym").bits_per_weight(shape) == 4.125
    assert get_format("int3-g64").bits_per_weight(shape) == 3.5
    assert get_format("int8-ch").bits_per_weight(shape) == 8 + 32 / 4096
    assert get_format("int4-g32").bits_per_weight(shape) == 5.0


def test_partial_last_group_is_counted():
    fmt = get_format("int4-g128")
    shape = (576, 576)  # 4.5 groups of 128 per row: the last group holds 64 inputs
    assert fmt.n_groups(576) == 5
    assert fmt.nbytes(shape) == 576 * 576 // 2 + 576 * 5 * 4


def test_q4_1_grid_is_reproduced_exactly_by_int4_g32():
    # a tensor on GGUF's Q4_1 grid (fp16 scale d and minimum m per 32 inputs, codes 0..15 all used)
    d = (torch.rand(8, 4) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(8, 4) * 0.1).half().float()
    q = torch.stack([torch.randperm(32) % 16 for _ in range(32)]).reshape(8, 4, 32).float()
    w = (q * d[..., None] + m[..., None]).reshape(8, 128)
    assert torch.equal(get_format("int4-g32").fake_quantize(w), w)


def test_symmetric_codes_are_centered():
    fmt = get_format("int8-ch-sym")
    w = torch.tensor([[-1.0, 0.0, 1.0, 0.5]])
    codes, _ = fmt.quantize_codes(w)
    assert codes.tolist() == [[128 - 127, 128, 128 + 127, 128 + 64]]


def test_constant_and_zero_groups_do_not_make_nan():
    for name in ("int4-g32", "int4-g32-sym"):
        w = torch.zeros(4, 64)
        w[1] = 0.25
        out = get_format(name).fake_quantize(w)
        assert torch.isfinite(out).all() and torch.allclose(out, w, atol=1e-3)


def test_clip_shrinks_the_range():
    fmt = get_format("int4-g64")
    w = torch.randn(8, 64)
    full = fmt.fit(w).values["scale"]
    half = fmt.fit(w, clip=0.5).values["scale"]
    assert torch.allclose(half, full * 0.5, rtol=1e-2)


def test_expand_gives_one_parameter_per_weight():
    fmt = get_format("int4-g32")
    w = torch.randn(4, 80)
    codes, params = fmt.quantize_codes(w)
    ex = fmt.expand(params.values, w.shape)
    assert ex["scale"].shape == w.shape
    assert torch.equal(fmt.decode(codes, ex), fmt.dequantize_codes(codes, params.values))


def test_weights_beyond_fp16_range_are_refused():
    with pytest.raises(ValueError, match="fp16"):
        get_format("int4-g32").quantize(torch.full((2, 32), 1e6) * torch.linspace(-1, 1, 32))


def test_zero_point_format_is_gptq_arithmetic():
    # w = scale * (q - zero) with integer zeros: what GPTQ/AWQ/compressed-tensors decode
    fmt = get_format("int4-g64-zp")
    w = torch.randn(16, 256) + 0.3
    stored = fmt.quantize(w)
    assert stored["zero"].dtype == torch.uint8 and stored["scale"].dtype == torch.float16
    codes, _ = fmt.unpack(stored, (16, 256))
    scale = stored["scale"].float().repeat_interleave(64, 1)
    zero = stored["zero"].float().repeat_interleave(64, 1)
    assert torch.equal(fmt.dequantize(stored, (16, 256)), (codes.float() - zero) * scale)
    assert fmt.bits_per_weight((4096, 4096)) == 4 + 24 / 64
    # zero itself is a code, so exact zeros stay zero (GPTQ widens the range to hold 0 as well)
    w[:, :64] = torch.rand(16, 64) + 1.0
    w[:, 0] = 0.0
    assert bool((fmt.fake_quantize(w)[:, 0] == 0).all())


def test_zero_point_and_symmetric_are_exclusive():
    with pytest.raises(Exception, match="int4-g64-sym-zp"):
        get_format("int4-g64-sym-zp")
