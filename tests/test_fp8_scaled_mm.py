"""FP8 W8A8 on fp8 tensor cores (torch._scaled_mm) against the float32 W8A8 reference. torch's CPU
build has _scaled_mm too, so the same code path runs here; on a GPU it is checked by
benchmarks/kernel_speed.py --gpu."""

import pytest
import torch

from ampq.formats.minifloat import MinifloatSpec
from ampq.kernels.activation import _fp8_token_matmul
from ampq.kernels.fp8_scaled_mm import _weight, scaled_mm_linear
from ampq.pipeline.blockwise import quantize_linear


@pytest.mark.parametrize("fmt", ["fp8-e4m3-ch", "fp8-e4m3", "fp8-e5m2-ch"])
def test_weights_are_used_as_stored_bit_for_bit(fmt):
    q = quantize_linear("l", torch.nn.Linear(64, 48), fmt)
    codes, scale = _weight(q, torch.device("cpu"))
    assert torch.equal(codes.float() * scale.reshape(-1, 1), q.dequantize(torch.float32))


@pytest.mark.parametrize("fmt", ["fp8-e4m3-ch", "fp8-e4m3", "fp8-e5m2-ch"])
def test_scaled_mm_matches_the_float32_w8a8_reference(fmt):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    q = quantize_linear("l", lin, fmt)
    x = torch.randn(11, 128) * torch.logspace(-2, 1, 128)
    x[3] = 0  # an all-zero token: scale 0, output 0
    spec = MinifloatSpec(4, 3)
    got = scaled_mm_linear(q, x, spec, cuda_only=False)
    assert got is not None, "torch's CPU _scaled_mm (2.13) takes every pair with an E4M3 side"
    want = _fp8_token_matmul(x, q.dequantize(torch.float32), spec)
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).norm() / want.norm()) < 1e-2
    assert torch.all(got[3] == 0)


def test_refused_where_it_cannot_run():
    spec = MinifloatSpec(4, 3)
    q = quantize_linear("l", torch.nn.Linear(64, 48), "fp8-e4m3-ch")
    assert scaled_mm_linear(q, torch.randn(2, 64), spec) is None  # a CPU tensor, cuda_only
    odd = quantize_linear("l", torch.nn.Linear(60, 48), "fp8-e4m3-ch")
    assert scaled_mm_linear(odd, torch.randn(2, 60), spec, cuda_only=False) is None  # K not a multiple of 16
    assert scaled_mm_linear(q, torch.randn(2, 64), MinifloatSpec(3, 4), cuda_only=False) is None  # no torch type
