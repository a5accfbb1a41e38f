"""The packed CPU kernels against the reference kernel (decode, then matmul): the ground truth."""

import pytest
import torch

from ampq import kernels
from ampq.kernels.cpu import packed_linear, supports
from ampq.kernels.cpu_slab import slab_linear
from ampq.kernels.cpu_slab import supports as slab_supports
from ampq.kernels.reference import reference_linear
from ampq.quantize import quantize_linear


def layer(fmt, out_features, in_features, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(1, in_features) * 4)  # channels of unequal size, as in real layers
    return quantize_linear("l", lin, fmt)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64", "int4-g128", "int4-g64-sym", "int4-g128-zp", "int8-ch", "int8-ch-sym",
                                 "int8-ch-zp", "int3-g128", "int3-g64-sym", "int2-g64", "int2-g32-zp"])
@pytest.mark.parametrize("shape", [(96, 256), (576, 576), (1536, 576)])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_packed_kernels_match_the_reference(fmt, shape, rows):
    q = layer(fmt, *shape, bias=rows != 4)
    if not fmt.startswith("int8") and shape[1] % int(fmt.split("-g")[1].split("-")[0]) != 0:
        assert not supports(q)  # a partial last group: the packed int4 kernel cannot hold it
        return
    assert supports(q)
    x = torch.randn(rows, shape[1])
    want = reference_linear(q, x)
    got = packed_linear(q, x)
    assert got.dtype == x.dtype and got.shape == want.shape
    # bf16 activations: about 2^-8 relative on top of the format's own error
    assert rel_err(got, want) < 6e-3, rel_err(got, want)


def test_dispatch_by_rows_mode_and_format():
    q = layer("int4-g64", 128, 256)
    few, many = torch.randn(1, 3, 256), torch.randn(2, 200, 256)
    assert torch.equal(q(many), slab_linear(q, many))  # prefill: decoded a slab at a time
    assert torch.equal(q(few), packed_linear(q, few)) and not torch.equal(q(few), reference_linear(q, few))
    with kernels.use("reference"):
        assert torch.equal(q(few), reference_linear(q, few))
        assert torch.equal(q(many), reference_linear(q, many))
    with pytest.raises(ValueError, match="unknown kernel mode"):
        with kernels.use("fast"):
            pass
    # formats without a packed kernel are decoded by slabs; those without a lookup form, or with a
    # partial last group, fall back to the reference, exactly
    for fmt, shape in [("nf4-b64", (64, 256)), ("int8-g64", (64, 256)), ("fp8-e4m3-ch", (64, 96))]:
        other = layer(fmt, *shape)
        x = torch.randn(1, shape[1])
        assert not supports(other) and slab_supports(other) and torch.equal(other(x), slab_linear(other, x)), fmt
    for fmt, shape in [("int4-g64", (64, 96)), ("int5-g64", (64, 256)), ("e3m2-g32", (64, 256))]:
        other = layer(fmt, *shape)
        x = torch.randn(1, shape[1])
        assert not slab_supports(other) and torch.equal(other(x), reference_linear(other, x)), fmt


@pytest.mark.parametrize("fmt", ["nf4-b64", "nf4-b64-dq", "fp4-b64", "fp8-e4m3-ch", "fp8-e5m2-ch", "fp8-e4m3",
                                 "e2m1-g32", "int8-g32-sym", "int8-ch", "int4-g128", "int4-g64-zp"])
@pytest.mark.parametrize("shape", [(96, 256), (1536, 512)])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_slab_kernel_matches_the_reference(fmt, shape, rows):
    q = layer(fmt, *shape, bias=rows != 5)
    assert slab_supports(q)
    x = torch.randn(rows, shape[1])
    want = reference_linear(q, x)
    got = slab_linear(q, x)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert rel_err(got, want) < 1e-5, rel_err(got, want)  # the same float32 weights, summed by slabs
    got16 = slab_linear(q, x.to(torch.bfloat16))
    assert got16.dtype == torch.bfloat16 and rel_err(got16.float(), want) < 6e-3


def test_slab_kernel_follows_an_input_permutation():
    from ampq.nn import QuantLinear

    q = layer("nf4-b64", 64, 256)
    perm = torch.randperm(256)
    permuted = QuantLinear(256, 64, "nf4-b64", q.stored(), q.bias, input_perm=perm)
    x = torch.randn(2, 256)
    assert rel_err(permuted(x), reference_linear(permuted, x)) < 1e-5
    assert rel_err(permuted(x), q(x)) > 0.1  # the permutation matters


def test_the_short_cpu_path_keeps_every_layer_option():
    # plain layers go straight to the packed kernel; the calibration cache and layers that treat
    # their inputs first (an AWQ input scale here) must still take the full path
    x = torch.randn(1, 256)
    plain = layer("int8-ch", 64, 256)
    assert torch.equal(plain(x), packed_linear(plain, x))
    with kernels.dequantized_weights_cached():
        assert torch.equal(plain(x), torch.nn.functional.linear(x, plain.dequantize(), plain.bias))
    scaled = layer("int8-ch", 64, 256)
    del scaled.input_scale
    scaled.register_buffer("input_scale", torch.rand(256) + 0.5)
    assert torch.equal(scaled(x), packed_linear(scaled, x / scaled.input_scale))
    assert not torch.equal(scaled(x), packed_linear(scaled, x))


@pytest.mark.slow
def test_greedy_decoding_on_the_real_model_agrees(smollm2):
    import copy

    import ampq

    model, tok = smollm2
    q = ampq.quantize(copy.deepcopy(model), "int4-g64", progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    fast = q.generate(ids, max_new_tokens=12, do_sample=False)
    with kernels.use("reference"):
        exact = q.generate(ids, max_new_tokens=12, do_sample=False)
    assert fast.shape == exact.shape and (fast == exact).float().mean() > 0.9
