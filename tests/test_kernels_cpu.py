"""The packed CPU kernels against the reference kernel (decode, then matmul): the ground truth."""

import pytest
import torch

from ampq import kernels
from ampq.kernels.cpu import packed_linear, supports
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


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64", "int4-g128", "int4-g64-sym", "int4-g128-zp", "int8-ch", "int8-ch-sym", "int8-ch-zp"])
@pytest.mark.parametrize("shape", [(96, 256), (576, 576), (1536, 576)])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_packed_kernels_match_the_reference(fmt, shape, rows):
    q = layer(fmt, *shape, bias=rows != 4)
    if fmt.startswith("int4") and shape[1] % int(fmt.split("-g")[1].split("-")[0]) != 0:
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
    assert torch.equal(q(many), reference_linear(q, many))  # prefill: decode once, dense matmul
    assert torch.equal(q(few), packed_linear(q, few)) and not torch.equal(q(few), reference_linear(q, few))
    with kernels.use("reference"):
        assert torch.equal(q(few), reference_linear(q, few))
    with pytest.raises(ValueError, match="unknown kernel mode"):
        with kernels.use("fast"):
            pass
    # formats and shapes the packed kernels cannot take fall back to the reference, exactly
    for fmt, shape in [("nf4-b64", (64, 256)), ("int4-g64", (64, 96)), ("int3-g64", (64, 256)), ("int8-g64", (64, 256))]:
        other = layer(fmt, *shape)
        x = torch.randn(1, shape[1])
        assert not supports(other) and torch.equal(other(x), reference_linear(other, x)), fmt


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
