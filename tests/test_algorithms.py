"""Each algorithm against plain round to nearest on real layers of the built-in model with real
calibration activations, and GPTQ against a straightforward float64 rendering of the paper."""

import pytest
import torch

import ampq
from ampq.algorithms.bias_correction import corrected_bias
from ampq.algorithms.clip import search_clip
from ampq.algorithms.gptq import DAMP, gptq, gptq_many
from ampq.algorithms.rtn import rtn
from ampq.calibrate import Calibration, LayerStats
from ampq.data import make_windows
from ampq.formats import get_format

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_layers():
    """Calibration and held-out inputs of every linear group of block 5 of smollm2-135m."""
    model, tok = ampq.load_model("smollm2-135m")
    calib = make_windows(tok, "wiki", "calib", 512, 48)
    held = make_windows(tok, "wiki", "eval", 256, 8)
    blocks = {}
    for name, windows in (("calib", calib), ("held", held)):
        cal = Calibration(model, windows.tokens, batch_size=8)
        for prefix, block in cal.blocks[:5]:
            cal.advance(block)
        block = cal.blocks[5][1]
        xs = {}
        for group in cal.groups(block):
            seen = []
            h = block.get_submodule(group[0]).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
            for i in range(len(cal.inputs)):
                cal._run(block, i)
            h.remove()
            xs[tuple(group)] = torch.cat(seen)
        blocks[name] = xs
    layers = []
    block = dict(model.named_modules())["model.layers.5"]
    for group, x in blocks["calib"].items():
        stats = LayerStats.empty(x.shape[1], "cpu")
        stats.add(x)
        for sub in group:
            layers.append((sub, block.get_submodule(sub).weight.detach().float(), stats, blocks["held"][group]))
    return layers


def output_error(w, deq, x):
    return ((x @ (w - deq).t()) ** 2).mean().item()


def deq(fmt, codes, params):
    return fmt.dequantize_codes(codes, params.values)


@pytest.mark.parametrize("fmt_name", ["int4-g64", "int3-g64", "nf4-b64", "int4-ch", "nvfp4", "mxfp4"])
def test_gptq_beats_rtn_on_held_out_inputs(real_layers, fmt_name):
    fmt = get_format(fmt_name)
    for sub, w, stats, x in real_layers:
        e_rtn = output_error(w, deq(fmt, *rtn(w, fmt)), x)
        e_gptq = output_error(w, deq(fmt, *gptq(w, fmt, stats)), x)
        assert e_gptq < e_rtn, (sub, e_gptq, e_rtn)


@pytest.mark.parametrize("fmt_name", ["int3-g64", "mxfp4"])
def test_gptq_in_order_with_dynamic_groups_beats_rtn(real_layers, fmt_name):
    fmt = get_format(fmt_name)
    for sub, w, stats, x in real_layers:
        codes, params = gptq(w, fmt, stats, act_order=False)
        assert output_error(w, deq(fmt, codes, params), x) < output_error(w, deq(fmt, *rtn(w, fmt)), x), sub


def test_clip_search_beats_rtn(real_layers):
    fmt = get_format("int3-g64")
    better = 0
    for sub, w, stats, x in real_layers:
        ratios = search_clip(w, fmt, stats)
        assert ratios.shape == (w.shape[0], fmt.n_groups(w.shape[1])) and 0.5 <= ratios.min() <= ratios.max() <= 1.0
        e_clip = output_error(w, deq(fmt, *rtn(w, fmt, None, ratios)), x)
        e_rtn = output_error(w, deq(fmt, *rtn(w, fmt)), x)
        better += e_clip < e_rtn
    assert better == len(real_layers)


def test_bias_correction_removes_the_mean_shift(real_layers):
    fmt = get_format("int3-g64")
    for sub, w, stats, x in real_layers:
        d = deq(fmt, *rtn(w, fmt))
        bias = corrected_bias(w, d, None, stats)
        calib_mean = stats.mean
        before = ((w - d) @ calib_mean).abs().mean()
        after = (calib_mean @ (d.t()) + bias - calib_mean @ w.t()).abs().mean()
        assert after < 1e-4 * max(before.item(), 1e-8) + 1e-6
        # and on held-out inputs the shift shrinks too
        shift_before = (x @ (w - d).t()).mean(0).abs().mean()
        shift_after = (x @ d.t() + bias - x @ w.t()).mean(0).abs().mean()
        assert shift_after < shift_before, sub


def gptq_paper(w, h, fmt, damp=DAMP):
    """The published algorithm, column by column, float64, no lazy batches: per-channel parameters
    fitted up front, group parameters when the group's first column is reached."""
    w, h = w.double().clone(), h.double().clone()
    n = h.shape[0]
    h += torch.eye(n, dtype=torch.float64) * damp * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros_like(w)
    gs = fmt.group_size
    vals = fmt.fit(w.float()).values if gs is None else None
    for j in range(n):
        if gs is not None and j % gs == 0:
            vals = fmt.fit(w[:, j:j + gs].float()).values
        c = fmt.encode(w[:, j:j + 1].float(), vals)
        q[:, j] = fmt.decode(c, vals)[:, 0].double()
        err = (w[:, j] - q[:, j]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
    return q


@pytest.mark.parametrize("fmt_name", ["int4-ch", "int3-g64-sym", "int4-g32"])
def test_gptq_matches_the_paper_in_float64(real_layers, fmt_name):
    fmt = get_format(fmt_name)
    sub, w, stats, x = real_layers[0]
    w = w[:48]  # a slice keeps the float64 loop short
    codes, params = gptq(w, fmt, stats, block_size=32, act_order=False, dtype=torch.float64)
    ours = deq(fmt, codes, params).double()
    ref = gptq_paper(w, stats.hessian, fmt)
    assert (ours - ref).abs().max().item() < 1e-5


def test_gptq_many_equals_gptq_job_by_job(real_layers):
    """One sweep over the stacked rows of every layer sharing an input x several formats (integer
    ones rounded together, NF4 and FP8 on their own rows) gives each job the result of gptq alone."""
    by_stats = {}
    for sub, w, stats, _ in real_layers:
        by_stats.setdefault(id(stats), (stats, []))[1].append(w[:96])
    stats, weights = next(iter(by_stats.values()))
    formats = ["int2-g64", "int3-g128", "int4-g64-sym", "int4-g32-zp", "nf4-b64-dq", "fp8-e4m3-ch", "int8-ch"]
    jobs = [(w, get_format(f), 1.0) for w in weights for f in formats]
    jobs.append((weights[0], get_format("int4-g64"), search_clip(weights[0], get_format("int4-g64"), stats)))
    many = gptq_many(jobs, stats, dtype=torch.float64, codes=True)
    for (w, fmt, clip), solved in zip(jobs, many):
        codes, params = gptq(w, fmt, stats, clip, dtype=torch.float64)
        ref = deq(fmt, codes, params)
        got = solved.dequantized
        assert got.shape == w.shape
        assert torch.equal(deq(fmt, solved.codes, solved.params), got), fmt.name  # codes and values agree
        assert (solved.codes != codes).float().mean().item() < 1e-3, fmt.name
        # the same arithmetic but for the summation order of the error feedback's products
        assert (got != ref).float().mean().item() < 1e-3, fmt.name
        assert torch.allclose(got.double(), ref.double(), atol=1e-6) or \
            ((w - got) ** 2).sum() <= ((w - ref) ** 2).sum() * 1.01, fmt.name


def test_gptq_many_gives_none_to_a_format_that_cannot_take_the_weight(real_layers):
    sub, w, stats, _ = real_layers[0]
    huge = w[:8] * 1e6  # beyond fp16 scales
    out = gptq_many([(huge, get_format("int4-g64"), 1.0), (w[:8], get_format("int4-g64"), 1.0)], stats)
    assert out[0] is None and out[1] is not None


def test_gptq_many_equals_gptq_for_gguf_block_formats():
    """K-quants and IQ4 (searched parameters, importance-weighted fit) go through the sweep's
    per-format path and give gptq's own codes."""
    torch.manual_seed(0)
    x = torch.randn(2048, 512) * torch.rand(512) * 3
    stats = LayerStats.empty(512, "cpu")
    stats.add(x)
    w = torch.randn(32, 512)
    jobs = [(w, get_format(f), 1.0) for f in ("q4_k", "q6_k", "iq4_nl", "int4-g128")]
    for (w, fmt, _), solved in zip(jobs, gptq_many(jobs, stats, codes=True)):
        codes, params = gptq(w, fmt, stats)
        assert (solved.codes != codes).float().mean().item() < 1e-3, fmt.name
        assert torch.allclose(solved.dequantized, deq(fmt, codes, params), atol=1e-5) or \
            (solved.dequantized != deq(fmt, codes, params)).float().mean().item() < 1e-3, fmt.name
