"""Every scheme through the whole pipeline on a tiny model: quantize, save, load, same logits."""

import pytest
import torch

import ampq
from ampq import AmpqError, QuantLinear, kernels
from ampq.schemes import SCHEMES, get_scheme
from test_model_io import logits, tiny_llama

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_scheme_round_trips_through_a_checkpoint(tmp_path, name):
    scheme = get_scheme(name)
    fmt = "int4-g32" if scheme.format.endswith("g128") else scheme.format.replace("b64", "b32")
    model = tiny_llama()
    ref = logits(model)
    ampq.quantize(model, fmt, calibration=CALIB if scheme.needs_calibration else None, progress=False,
                  **scheme.quantize_kwargs())
    out = logits(model)
    assert (out - ref).abs().mean() < 0.2 * ref.abs().mean()
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.activation == scheme.activation
    ampq.save(model, tmp_path / name)
    loaded = ampq.load(tmp_path / name)
    assert torch.equal(logits(loaded), out)


def test_tgi_spellings():
    assert get_scheme("bitsandbytes").name == "llm-int8"
    assert get_scheme("bitsandbytes-nf4").format == "nf4-b64"
    assert get_scheme("bitsandbytes-fp4").format == "fp4-b64"
    for name in ("awq", "eetq", "gptq", "fp8"):
        assert get_scheme(name).name == name
    with pytest.raises(AmpqError, match="gptq"):
        get_scheme("gtpq")


def test_calibrated_schemes_refuse_to_run_without_text():
    with pytest.raises(AmpqError, match="calibration"):
        ampq.quantize(tiny_llama(), "int4-g32", algorithm="gptq", progress=False)


def test_bias_correction_adds_a_bias_that_survives_save_and_load(tmp_path):
    model = ampq.quantize(tiny_llama(), "int3-g32", calibration=CALIB, bias_correction=True, progress=False)
    layer = model.model.layers[1].self_attn.o_proj
    assert layer.bias is not None and layer.bias.abs().sum() > 0 and layer.algorithm == "rtn+bias"
    ampq.save(model, tmp_path / "b")
    assert torch.equal(logits(ampq.load(tmp_path / "b")), logits(model))


def test_gptq_beats_rtn_on_the_calibration_text():
    """The whole-model objective GPTQ works for: output error on the text it saw."""
    from ampq.data import Windows
    from ampq.evaluation import Reference, evaluate

    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))
    windows = Windows(tokens, [0] * 8, 32, 32, "random")
    ref = Reference(tiny_llama(), windows)
    rtn = evaluate(ampq.quantize(tiny_llama(), "int3-g32", progress=False), windows, ref, progress=False)
    gptq = evaluate(ampq.quantize(tiny_llama(), "int3-g32", algorithm="gptq", calibration=tokens, progress=False),
                    windows, ref, progress=False)
    assert gptq.kl < rtn.kl


def test_compute_dtype_is_kept_and_used(tmp_path):
    model = ampq.quantize(tiny_llama(), "nf4-b32", compute_dtype="bfloat16", progress=False)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, layer.in_features)
    expected = torch.nn.functional.linear(x.bfloat16(), layer.dequantize(torch.bfloat16)).float()
    with kernels.use("reference"):
        assert layer(x).dtype == torch.float32 and torch.equal(layer(x), expected)
    fast = layer(x)  # the slab kernel: the same bf16 weights and product, summed by slabs
    assert fast.dtype == torch.float32 and float((fast - expected).norm() / expected.norm()) < 4e-3
    ampq.save(model, tmp_path / "c")
    assert ampq.load(tmp_path / "c").model.layers[0].mlp.up_proj.compute_dtype == "bfloat16"
    with pytest.raises(AmpqError, match="dtype"):
        ampq.quantize(tiny_llama(), "nf4-b32", compute_dtype="float12", progress=False)
