"""Activation-quantized kernels (ampq.kernels.activation): LLM.int8 against bitsandbytes, FP8 W8A8."""

import copy
import logging

import pytest
import torch
from torch import nn

from ampq.kernels.activation import (ActivationError, activation_linear, fp8_quantize_tokens,
                                     int8_matmul_exact, int8_quantize_rows, int8_weight,
                                     parse_activation)
from ampq.formats.minifloat import MinifloatSpec
from ampq.pipeline.blockwise import quantize_linear

# bnb logs a warning each time it casts float32 inputs to fp16 for quantization
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

SHAPES = [(256, 64), (96, 256)]  # (in_features, out_features)
OUTLIER_COLS = [3, 17, 40]


def _linear(n_in, n_out, seed, *, exact_scales=False, bias=True):
    """nn.Linear with random weights. ``exact_scales``: weights fp16-representable and each row's
    absmax 127 * 2^-e, so absmax/127 is a power of two: ampq's fp16 step and bnb's float32 SCB
    then describe the same quantizer and give identical codes."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    w = torch.randn(n_out, n_in, generator=g) * 0.05
    if exact_scales:
        e = torch.randint(7, 11, (n_out, 1), generator=g).float()
        w = (w / w.abs().amax(dim=1, keepdim=True) * (127 * 2.0 ** -e)).half().float()
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g) * 0.1)
    return lin


def _inputs(n_in, seed, *, outliers, shape=(16,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, n_in, generator=g).clamp(-5.5, 5.5)
    if outliers:
        flat = x.view(-1, n_in)
        for j, col in enumerate(OUTLIER_COLS):
            rows = torch.randperm(flat.shape[0], generator=g)[: 1 + j]
            mag = 8 + 12 * torch.rand(len(rows), generator=g)
            sign = torch.where(torch.rand(len(rows), generator=g) < 0.5, -1.0, 1.0)
            flat[rows, col] = mag * sign  # |x| in [8, 20]
    return x


def _ampq(lin, activation="int8-outlier:6.0"):
    q = quantize_linear("t", lin, "int8-ch-sym")
    q.activation = activation
    return q


def _bnb(lin, threshold, codes_from=None):
    """bnb's Linear8bitLt (inference, has_fp16_weights=False) holding ``lin``'s weights.

    On CPU in 0.50 the weights are quantized when the module is moved to a device: load the float
    state dict, then ``.to("cpu")`` (Int8Params.to quantizes float CPU data). ``codes_from``: an
    ampq int8-ch-sym layer whose codes and steps replace bnb's own (SCB = 127 * step)."""
    bnb = pytest.importorskip("bitsandbytes")
    m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            has_fp16_weights=False, threshold=threshold)
    m.load_state_dict(lin.state_dict())
    m = m.to("cpu").eval()  # eval: in training mode bnb's CPU path is a plain dequantized matmul
    assert m.weight.dtype == torch.int8 and m.weight.SCB is not None
    if codes_from is not None:
        cb, step = int8_weight(codes_from)
        m.weight.data = cb.clone()
        m.weight.CB, m.weight.SCB = m.weight.data, 127 * step
    return m


def _run_bnb(m, x):
    with torch.no_grad():
        return m(x)


def _magnitude(x, lin):
    """Bound on every partial sum's size: max_ij (|x| @ |W|^T + |b|)."""
    x2 = x.reshape(-1, x.shape[-1]).double().abs()
    s = x2 @ lin.weight.detach().double().abs().T
    if lin.bias is not None:
        s = s + lin.bias.detach().double().abs()
    return float(s.max())


# Tolerance against bnb with identical codes and scales, as a fraction of M = max_ij (|x| @ |W|^T
# + |b|), a bound on every partial sum. float32: bnb scales the int32 sums by 6.200124e-05 instead
# of 1/127^2 (1.8e-5 relative) plus a few float32 roundings -> 2.5e-5 M. fp16: bnb rounds
# (int8 part + bias) to fp16, then (that + outlier part); ampq rounds the float32 sum once, then
# adds the bias in fp16: four fp16 roundings of at most 2^-11 M each -> 2^-9 M.
ATOL = {torch.float32: 2.5e-5, torch.float16: 2.0 ** -9}


def _assert_matches_bnb(y, yb, x, lin):
    assert y.dtype == yb.dtype == x.dtype and y.shape == yb.shape
    atol = ATOL[x.dtype] * _magnitude(x, lin)
    err = (y.double() - yb.double()).abs().max().item()
    assert err <= atol, f"max |ampq - bnb| = {err:.3g} > {atol:.3g}"


def _int8_error_bound(x, lin, q, threshold):
    """|y - x W^T| <= sum_k |x_ik| step_j / 2 (weights: half a step, outlier columns included, as
    they use the int8 weights) + a_i / 254 sum_{k not outlier} |w^_jk| (activations: half a step
    of the token's int8 scale) + 2^-11 sum_k |x_ik w^_jk| (the fp16 copy that is quantized)
    + rounding of the output dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    _, a, cols = int8_quantize_rows(x2, threshold)
    _, step = int8_weight(q)
    w_hat = q.dequantize(torch.float32).double().abs()
    xa = x2.double().abs()
    w_in = w_hat.clone()
    w_in[:, cols] = 0
    bound = (xa.sum(dim=1, keepdim=True) * step.double() / 2 + (a.double() / 254).unsqueeze(1) * w_in.sum(dim=1)
             + 2.0 ** -11 * xa @ w_hat.T)
    return bound + ATOL[x.dtype] * _magnitude(x, lin)


# ---- LLM.int8 ---------------------------------------------------------------------------------------
def test_parse_modes():
    assert parse_activation("int8-outlier").threshold == 6.0
    assert parse_activation("int8-outlier:6.0").threshold == 6.0
    assert parse_activation("int8-outlier:3").threshold == 3.0
    assert parse_activation("fp8-e4m3-token").spec.max_finite == 448.0
    assert parse_activation("fp8-e5m2-token").spec.max_finite == 57344.0


def test_int8_activation_quantization_is_bnbs_exactly():
    """Outlier columns (|x| >= T, on the fp16 copy), row absmax and codes equal bnb's op bit for bit."""
    import bitsandbytes.functional as bF

    x = _inputs(256, 1, outliers=True, shape=(24,))
    x[5, 77] = 6.0  # exactly at the threshold: bnb counts it (>=)
    x[6, 90] = 5.999  # below in float32, 6.0 once in fp16: an outlier for bnb too
    x[7] = 0.0  # a zero token
    x[8] *= 0.1
    x[8, OUTLIER_COLS[0]] = 5.0  # token 8's largest entry lies in an outlier column...
    x[9, OUTLIER_COLS[0]] = 15.0  # (made one here): it still sets token 8's scale
    q, absmax, cols = int8_quantize_rows(x, 6.0)
    qb, absmax_b, cols_b = bF.int8_vectorwise_quant(x.half().clone(), threshold=6.0)
    assert torch.equal(cols, cols_b.long())
    assert set(OUTLIER_COLS + [77, 90]) == set(cols.tolist())
    assert torch.equal(absmax, absmax_b)
    keep = absmax > 0  # bnb computes 0 * inf = NaN codes for a zero token; ampq gives 0
    assert torch.equal(q[keep], qb[keep])
    assert torch.equal(q[7], torch.zeros(256, dtype=torch.int8))
    assert absmax[8] == 5.0
    assert int(q[:, cols].abs().sum()) == 0


def test_int8_matmul_is_exact_beyond_float32():
    """Integer dot products over 3000 inputs reach 4.8e7 > 2^24: still exact (int32 semantics)."""
    g = torch.Generator().manual_seed(12)
    a = torch.randint(-127, 128, (4, 3000), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (5, 3000), generator=g, dtype=torch.int8)
    a[0] = 127
    b[0] = torch.randint(100, 128, (3000,), generator=g, dtype=torch.int8)
    b[1] = -128
    exact = a.long() @ b.long().T
    assert int(exact.abs().max()) > 2 ** 24
    assert torch.equal(int8_matmul_exact(a, b), exact.double())


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_int8_weights_identical_to_bnb_when_scales_are_exact(n_in, n_out):
    lin = _linear(n_in, n_out, 2, exact_scales=True)
    cb, step = int8_weight(_ampq(lin))
    m = _bnb(lin, 6.0)
    assert torch.equal(cb, m.weight.CB)
    assert torch.equal(127 * step, m.weight.SCB)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("outliers", [True, False])
@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_int8_outlier_matches_bnb(n_in, n_out, outliers, dtype):
    lin = _linear(n_in, n_out, 3, exact_scales=True)
    x = _inputs(n_in, 4, outliers=outliers, shape=(2, 8)).to(dtype)
    q = _ampq(lin)
    y = q(x)
    m = _bnb(lin, 6.0)
    yb = _run_bnb(m, x)
    assert (m.state.idx.numel() > 0) == outliers  # outliers really were decomposed (or not)
    _assert_matches_bnb(y, yb, x, lin)
    # and it is LLM.int8 of the float layer: within the int8 rounding of weights and activations
    err = (y.double() - lin(x.float()).double()).reshape(-1, n_out).abs()
    assert (err <= _int8_error_bound(x, lin, q, 6.0)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_outlier_matches_bnb_fed_ampq_codes(dtype):
    """Arbitrary weights: ampq's fp16 step differs from bnb's float32 SCB, so feed bnb ampq's codes."""
    lin = _linear(256, 64, 5)
    q = _ampq(lin)
    x = _inputs(256, 6, outliers=True).to(dtype)
    yb = _run_bnb(_bnb(lin, 6.0, codes_from=q), x)
    _assert_matches_bnb(q(x), yb, x, lin)


def test_int8_weight_quantizers_differ_by_at_most_one_code():
    """The documented difference: bnb quantizes the same float weights with SCB = absmax(fp16(w)),
    ampq with an fp16 step absmax/127: each rounds once to fp16 (half an ulp, 2^-11 relative), so
    the steps agree within 2^-10 relative and the codes (|w| / step <= 127) within one."""
    lin = _linear(256, 64, 7)
    cb, step = int8_weight(_ampq(lin))
    m = _bnb(lin, 6.0)
    step_b = m.weight.SCB / 127
    assert ((step - step_b).abs() <= 2.0 ** -10 * step_b).all()
    diff = (cb.int() - m.weight.CB.int()).abs()
    assert int(diff.max()) <= 1
    assert float((diff == 0).float().mean()) > 0.9


@pytest.mark.parametrize("threshold", ["1e9", "0"])
def test_int8_no_outliers_is_the_pure_int8_path(threshold):
    """With a threshold no entry reaches (or 0: decomposition off, as bnb) every column is int8."""
    lin = _linear(256, 64, 8, exact_scales=True)
    q = _ampq(lin, f"int8-outlier:{threshold}")
    x = _inputs(256, 9, outliers=True)  # entries up to 20, all quantized to int8 now
    y = q(x)
    # the int8 path written out: row absmax of the fp16 copy, codes, exact integer dot products
    cb, step = int8_weight(q)
    x16 = x.half().float()
    a = x16.abs().amax(dim=1, keepdim=True)
    codes = torch.round(x16 * (127.0 / a))
    acc = codes.double() @ cb.double().T
    expect = (acc * (a.double() / 127) * step.double() + lin.bias.double()).float()
    assert torch.allclose(y, expect, rtol=1e-6, atol=1e-6)
    # bnb without decomposition (threshold 0.0: int8_scaled_mm)
    _assert_matches_bnb(y, _run_bnb(_bnb(lin, 0.0), x), x, lin)
    # and it is not what the decomposition gives
    assert (y - _ampq(lin)(x)).abs().max() > 1e-3


def test_int8_outlier_columns_take_the_float_path():
    lin = _linear(256, 64, 10, exact_scales=True)
    q = _ampq(lin)
    w_deq = q.dequantize(torch.float32).double()
    x = _inputs(256, 11, outliers=False)
    x1, x2 = x.clone(), x.clone()
    x1[0, 7], x2[0, 7] = 1000.0, 500.0  # would set token 0's int8 step to 1000/127
    y1, y2 = q(x1), q(x2)
    # column 7 is an outlier column in both and token 0's int8 scale ignores it: the difference
    # is the float product 500 * W_deq[:, 7], to float32 accuracy
    diff = (y1 - y2).double()
    ulps = 4 * 2.0 ** -24 * float(y1[0].abs().max())  # float32 rounding of the two outputs
    assert torch.allclose(diff[0], 500.0 * w_deq[:, 7], rtol=0, atol=ulps)
    assert torch.equal(y1[1:], y2[1:])
    # error vs the float product on the int8 weights: only the int8 rounding of token 0's other
    # entries (half a step of max_k!=7 |x_0k| / 127 each) and their fp16 copy (2^-11 relative)
    ref = x1.double() @ w_deq.T + lin.bias.double()
    rest = x1[0, torch.arange(256) != 7].double().abs()
    bound = 0.5 * float(rest.max()) / 127 * w_deq.abs().sum(dim=1) + 2.0 ** -11 * (rest @ w_deq[:, torch.arange(256) != 7].abs().T) + 1e-4
    err = (y1[0].double() - ref[0]).abs()
    assert (err <= bound).all()
    # without the decomposition the token's int8 step is 1000/127 and its other entries are lost
    y_int8 = _ampq(lin, "int8-outlier:0")(x1)
    assert (y_int8[0].double() - ref[0]).abs().max() > 10 * err.max()
    # and bnb agrees
    _assert_matches_bnb(y1, _run_bnb(_bnb(lin, 6.0), x1), x1, lin)


# ---- FP8 W8A8 ---------------------------------------------------------------------------------------
FP8_CASES = [("fp8-e4m3-ch", "fp8-e4m3-token"), ("fp8-e5m2-ch", "fp8-e5m2-token"), ("fp8-e4m3", "fp8-e5m2-token")]


def _fp8_layer(fmt, mode, n_in=256, n_out=96, bias=False, seed=20):
    lin = _linear(n_in, n_out, seed, bias=bias)
    q = quantize_linear("t", lin, fmt)
    q.activation = mode
    return lin, q


def _fp8_inputs(n_in=256, seed=21):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, n_in, generator=g)
    x = x * 10.0 ** (4 * torch.rand(12, 1, generator=g) - 2)  # token magnitudes from 0.01 to 100
    x[3] = 0.0
    x[4, 9] = 50 * x[4].abs().max()  # one token with a large entry: the rest of it goes subnormal
    return x


def _spec_tolerances(spec: MinifloatSpec):
    """(u, eta): rounding to the grid errs by at most u |v| + eta * (scale), u = 2^-(M+1) the half
    ulp relative to a normal value, eta = half the subnormal quantum 2^(emin-M-1) (in scaled units)."""
    return 2.0 ** -(spec.man_bits + 1), 2.0 ** (spec.emin - spec.man_bits - 1)


@pytest.mark.parametrize("fmt,mode", FP8_CASES)
def test_fp8_token_error_bound(fmt, mode):
    """|y - x W^T| <= sum_k (|dx_k| |w^_k| + |x_k| |dw_k|) elementwise, with
    |dx_ik| <= u_a |x_ik| + eta_a s_i (s_i = absmax_i / max_finite, per token) and
    |dw_jk| <= u_w |w_jk| + eta_w t_j (t_j the weight scale), u = 2^-4 for e4m3, 2^-3 for e5m2,
    plus float32 arithmetic: 2^-20 of sum_k |x^_k w^_k|."""
    lin, q = _fp8_layer(fmt, mode)
    x = _fp8_inputs()
    y = q(x)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    w = lin.weight.detach().double()
    w_hat = q.dequantize(torch.float32).double()
    spec_a, spec_w = parse_activation(mode).spec, q.format.spec
    u_a, eta_a = _spec_tolerances(spec_a)
    u_w, eta_w = _spec_tolerances(spec_w)
    u_a, u_w = u_a + 2.0 ** -22, u_w + 2.0 ** -22  # the float32 divide / multiply by the scale
    xa = x.double().abs()
    s = xa.amax(dim=1, keepdim=True) / spec_a.max_finite
    t = q.scale.double().reshape(-1, 1).expand(w.shape[0], 1)
    dx = u_a * xa + eta_a * s
    dw = u_w * w.abs() + eta_w * t
    x_hat_abs = xa + dx
    bound = dx @ w_hat.abs().T + xa @ dw.T + 2.0 ** -20 * (x_hat_abs @ w_hat.abs().T)
    err = (y.double() - x.double() @ w.T).abs()
    assert (err <= bound).all(), f"worst err/bound {float((err / bound.clamp_min(1e-30)).max()):.3f}"
    # the activations really are quantized: not just the weight-only product
    assert (y.double() - x.double() @ w_hat.T).abs().max() > 1e-3 * (x_hat_abs @ w_hat.abs().T).max()


@pytest.mark.parametrize("fmt,mode", FP8_CASES)
def test_fp8_token_matches_torch_float8_casts(fmt, mode):
    """An independent reference: per-token scale, torch's float8 cast, dequantize, matmul."""
    lin, q = _fp8_layer(fmt, mode, bias=True)
    x = _fp8_inputs()
    spec = parse_activation(mode).spec
    dtype = torch.float8_e4m3fn if spec.exp_bits == 4 else torch.float8_e5m2
    s = x.abs().amax(dim=1, keepdim=True) / spec.max_finite
    xq = torch.where(s > 0, x / torch.where(s > 0, s, 1), 0).to(dtype).float()
    expect = (xq * s) @ q.dequantize(torch.float32).T + lin.bias
    assert torch.allclose(q(x), expect, rtol=1e-6, atol=1e-6)
    values, scale = fp8_quantize_tokens(x, spec)
    assert torch.equal(values, xq) and torch.equal(scale, s)


@pytest.mark.parametrize("mode", ["fp8-e4m3-token", "fp8-e5m2-token"])
def test_fp8_token_zero_rows_and_scaling_invariance(mode):
    _, q = _fp8_layer("fp8-e4m3-ch", mode)
    x = _fp8_inputs()
    y = q(x)
    assert torch.equal(y[3], torch.zeros_like(y[3]))
    assert torch.equal(q(torch.zeros(5, 256)), torch.zeros(5, 96))
    # per-token scales: multiplying one token by 2^k multiplies its output row by 2^k exactly and
    # leaves the other rows alone
    x2 = x.clone()
    x2[0] *= 2.0 ** 7
    x2[1] *= 2.0 ** -5
    y2 = q(x2)
    assert torch.equal(y2[0], y[0] * 2.0 ** 7)
    assert torch.equal(y2[1], y[1] * 2.0 ** -5)
    assert torch.equal(y2[2:], y[2:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_token_low_precision_inputs_and_bias(dtype):
    lin, q = _fp8_layer("fp8-e4m3-ch", "fp8-e4m3-token", bias=True)
    x = _fp8_inputs().to(dtype).reshape(3, 4, 256)
    y = q(x)
    assert y.dtype == dtype and y.shape == (3, 4, 96)
    # the float32 product rounded to x's dtype, then the bias added in x's dtype
    no_bias = copy.deepcopy(q)
    no_bias.bias = None
    core = activation_linear(no_bias, x.float())
    assert core.dtype == torch.float32
    assert torch.equal(y, core.to(dtype) + lin.bias.detach().to(dtype))


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int4-outlier", "fp8-token", "int8", "fp8-e4m3-token:2", "int8-outlier:abc",
                                  "int8-outlier:-1", "int8-outlier:nan"])
def test_bad_mode_raises(mode):
    lin = _linear(64, 32, 30)
    q = _ampq(lin, mode)
    with pytest.raises(ValueError) as info:
        q(torch.randn(2, 64))
    msg = str(info.value)
    assert mode in msg
    if mode in ("int4-outlier", "fp8-token", "int8"):
        assert "int8-outlier:T" in msg and "fp8-e4m3-token" in msg and "fp8-e5m2-token" in msg


@pytest.mark.parametrize("fmt,mode,needs", [
    ("fp8-e4m3-ch", "int8-outlier:6.0", "int8-ch-sym"),
    ("int8-ch", "int8-outlier:6.0", "int8-ch-sym"),  # asymmetric int8
    ("int8-g128-sym", "int8-outlier:6.0", "int8-ch-sym"),  # per group, not per channel
    ("int8-ch-sym", "fp8-e4m3-token", "fp8"),
    ("nf4-b64", "fp8-e5m2-token", "fp8"),
    ("e2m1-g32", "fp8-e4m3-token", "fp8"),  # a minifloat, but not 8 bits
    ("fp8-e4m3-g128", "fp8-e4m3-token", "per output channel"),  # fp8 with group scales
])
def test_wrong_weight_format_raises(fmt, mode, needs):
    q = quantize_linear("t", _linear(256, 32, 31), fmt)
    q.activation = mode
    with pytest.raises(ValueError, match=needs) as info:
        q(torch.randn(2, 256))
    assert fmt in str(info.value) and isinstance(info.value, ActivationError)
