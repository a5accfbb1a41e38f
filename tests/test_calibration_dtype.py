"""The calibration passes in bf16 (the default on a processor with bf16 matrix instructions, and on
GPUs): which device gets which dtype, statistics accumulated in float32 from what the layers
received, and figures within bf16's rounding of the float32 passes. (Every other test runs the
passes in float32: conftest.py.)"""

import pytest
import torch

from ampq import AmpqError
from ampq.calibrate import Calibration, LayerStats, autocast_dtype
from ampq.fisher import output_fisher
from ampq.kernels import cpu_bf16
from ampq.report import block_linear_names
from test_model_io import tiny_llama
from test_resume import model_dir  # noqa: F401  (a fixture: a 12-block random Llama with a tokenizer)

TOKENS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def native(monkeypatch):
    """Say whether the processor multiplies bf16 natively, for the ``auto`` setting."""
    def set_native(flag: bool):
        monkeypatch.setenv("AMPQ_CPU_BF16", "1" if flag else "0")
        cpu_bf16.native.cache_clear()
    yield set_native
    monkeypatch.delenv("AMPQ_CPU_BF16")
    cpu_bf16.native.cache_clear()


def test_which_dtype_each_device_gets(monkeypatch, native):
    monkeypatch.setenv("AMPQ_CALIB_DTYPE", "auto")
    native(True)
    assert autocast_dtype("cpu") is torch.bfloat16
    native(False)
    assert autocast_dtype("cpu") is None  # emulated bf16 is slower than float32: the model's own dtype
    assert autocast_dtype("meta") is None
    monkeypatch.setenv("AMPQ_CALIB_DTYPE", "bfloat16")
    assert autocast_dtype("cpu") is torch.bfloat16
    monkeypatch.setenv("AMPQ_CALIB_DTYPE", "float32")
    native(True)
    assert autocast_dtype("cpu") is None
    monkeypatch.setenv("AMPQ_CALIB_DTYPE", "fp8")
    with pytest.raises(AmpqError, match="AMPQ_CALIB_DTYPE='fp8'"):
        autocast_dtype("cpu")


def test_input_statistics_are_float32_sums_inside_a_bf16_pass():
    x = torch.randn(4, 32, 64)
    plain = LayerStats.partial(x)
    with torch.autocast("cpu", torch.bfloat16):
        inside = LayerStats.partial(x)
    assert inside[0].dtype == torch.float32
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)


def _stats(dtype: str, monkeypatch) -> tuple[dict, list[torch.Tensor]]:
    monkeypatch.setenv("AMPQ_CALIB_DTYPE", dtype)
    model = tiny_llama()
    cal = Calibration(model, TOKENS, batch_size=4)
    assert cal.autocast == (torch.bfloat16 if dtype == "bfloat16" else None)
    out = {}
    for prefix, block in cal.on_device():
        stats = cal.stats_and_advance(block, cal.groups(block))
        out.update({f"{prefix}.{k}": v for k, v in stats.items()})
    return out, list(cal.inputs)


def test_bf16_passes_stay_within_bf16_rounding_of_float32(monkeypatch):
    ref, ref_out = _stats("float32", monkeypatch)
    fast, fast_out = _stats("bfloat16", monkeypatch)
    assert ref.keys() == fast.keys()
    # each product rounds its operands to bf16 (2^-9 relative); a few roundings compound over two
    # blocks, so the sums and the outputs agree to a few times that, and differ (bf16 really ran;
    # not yet at the first linears, whose input is the first norm's)
    errors = {}
    for name in ref:
        a, b = ref[name].xtx, fast[name].xtx
        assert b.dtype == torch.float32
        errors[name] = float((a - b).norm() / a.norm())
    assert max(errors.values()) < 16 * 2 ** -9, errors
    assert errors["model.layers.0.self_attn.q_proj"] == 0 and errors["model.layers.1.self_attn.q_proj"] > 0
    for a, b in zip(ref_out, fast_out):
        assert a.dtype == b.dtype == torch.float32
        rel = float((a - b).norm() / a.norm())
        assert 0 < rel < 16 * 2 ** -9, rel


def test_fisher_weights_in_bf16_stay_close_to_float32(monkeypatch):
    names = block_linear_names(tiny_llama())
    monkeypatch.setenv("AMPQ_CALIB_DTYPE", "float32")
    ref = output_fisher(tiny_llama(), TOKENS[:3], names, progress=False)
    monkeypatch.setenv("AMPQ_CALIB_DTYPE", "bfloat16")
    fast = output_fisher(tiny_llama(), TOKENS[:3], names, progress=False)
    for n in names:
        assert fast[n].dtype == ref[n].dtype
        rel = float((ref[n] - fast[n]).norm() / ref[n].norm())
        # squared gradients: twice the relative error of the gradients, and labels sampled from
        # logits that moved by bf16's rounding
        assert 0 < rel < 0.1, (n, rel)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_run_says_when_its_passes_run_in_bf16(model_dir, monkeypatch, capsys, dtype):  # noqa: F811
    import ampq
    from ampq.data import Text

    monkeypatch.setenv("AMPQ_CALIB_DTYPE", dtype)
    model, tok = ampq.load_model(str(model_dir))
    ampq.quantize(model, "int4-g32", algorithm="gptq", calibration=Text("wiki", windows=2, window=32), tokenizer=tok)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("calibration: "))
    assert ("multiply in bf16" in line) == (dtype == "bfloat16"), line
