"""transformers integration: AutoModelForCausalLM.from_pretrained loads ampq checkpoints after `import ampq`."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import ampq
from ampq import AmpqError, QuantLinear, kernels
from ampq.pipeline.adaptive import adapt, nested_layers, quantize_adaptive
from ampq.nested import NestedLinear
from test_model_io import IDS, logits, tiny_llama

FORMATS = ["int4-g32", "nf4-b32-dq", "fp8-e4m3-ch", "int8-ch", "nvfp4", "mxfp4", {"*mlp*": "int8-ch", "*": "int4-g32"}]


def from_pretrained(path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    return model


def test_import_ampq_registers_without_importing_the_quantizers():
    code = ("import sys, ampq; assert 'transformers.quantizers' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q, AUTO_QUANTIZATION_CONFIG_MAPPING as C; "
            "assert Q['ampq'].__name__ == 'AmpqHfQuantizer' and C['ampq'] is ampq.hf.AmpqConfig")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("spec", FORMATS, ids=lambda s: s if isinstance(s, str) else "mixed")
def test_from_pretrained_equals_ampq_load(tmp_path, spec):
    model = ampq.quantize(tiny_llama(), spec, progress=False)
    ampq.save(model, tmp_path / "ckpt")
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ampq" and qc["dtype"] == "float32" and len(qc["layers"]) == 2 * 7

    ref = logits(ampq.load(tmp_path / "ckpt"))
    hf = from_pretrained(tmp_path / "ckpt")
    assert isinstance(hf.model.layers[1].mlp.down_proj, QuantLinear)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight and hf.dtype == torch.float32
    assert torch.equal(logits(hf), ref) and torch.equal(ref, logits(model))
    out = hf.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)

    hf.save_pretrained(tmp_path / "again")
    again = from_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["layers"] == qc["layers"]
    assert torch.equal(logits(again), ref)


def test_mixed_format_layers_keep_their_formats(tmp_path):
    ampq.save(ampq.quantize(tiny_llama(), {"*mlp*": "int8-ch", "*": "int4-g32"}, progress=False), tmp_path / "m")
    hf = from_pretrained(tmp_path / "m")
    assert hf.model.layers[0].mlp.up_proj.format_name == "int8-ch"
    assert hf.model.layers[0].self_attn.k_proj.format_name == "int4-g32"


@pytest.mark.parametrize("variant", ["awq", "activation", "compute_dtype"])
def test_layer_options_survive(tmp_path, variant):
    # AWQ's input scales, quantized activations and a compute dtype are in the layer table too
    kwargs = {"awq": dict(awq=True, calibration=torch.randint(0, 256, (2, 32))),
              "activation": dict(activation="int8-outlier:6.0"), "compute_dtype": dict(compute_dtype="bfloat16")}
    fmt = "int8-ch-sym" if variant == "activation" else "int4-g32"
    ampq.save(ampq.quantize(tiny_llama(), fmt, progress=False, **kwargs[variant]), tmp_path / "m")
    hf = from_pretrained(tmp_path / "m")
    layer = hf.model.layers[0].self_attn.o_proj  # where AWQ's scale cannot fold into the layer before
    assert (layer.input_scale is not None, layer.activation, layer.compute_dtype) == {
        "awq": (True, None, None), "activation": (False, "int8-outlier:6.0", None),
        "compute_dtype": (False, None, "bfloat16")}[variant]
    assert torch.equal(logits(hf), logits(ampq.load(tmp_path / "m")))


def test_partly_quantized_and_untied_head(tmp_path):
    # linears left unquantized stay nn.Linear; a quantized lm_head unties the embeddings
    model = ampq.quantize(tiny_llama(tie=False), {"*.self_attn.*": None, "*": "int4-g32"}, lm_head=True, progress=False)
    ampq.save(model, tmp_path / "m")
    hf = from_pretrained(tmp_path / "m")
    assert type(hf.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(hf.lm_head, QuantLinear)
    assert torch.equal(logits(hf), logits(ampq.load(tmp_path / "m")))


def test_config_alone_is_enough_as_from_a_hub_repo(tmp_path):
    # a hub download fetches config.json and the safetensors, not ampq.json
    ampq.save(ampq.quantize(tiny_llama(), "int4-g32", progress=False), tmp_path / "ckpt")
    ref = logits(ampq.load(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "ampq.json").unlink()
    assert torch.equal(logits(from_pretrained(tmp_path / "ckpt")), ref)


def test_dtype_auto_follows_the_unquantized_tensors(tmp_path):
    model = ampq.quantize(tiny_llama().to(torch.bfloat16), "int4-g32", progress=False)
    model.config.dtype = None  # the config does not say: fp16 scales must not decide
    ampq.save(model, tmp_path / "m")
    hf = from_pretrained(tmp_path / "m")
    assert hf.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(logits(hf), logits(ampq.load(tmp_path / "m")))


def test_adaptive_checkpoint(tmp_path):
    model = quantize_adaptive(tiny_llama(), [4, 8], torch.randint(0, 256, (4, 32)), base_format="int4-g32",
                              progress=False)
    ampq.save(model, tmp_path / "ad")
    ref = logits(ampq.load(tmp_path / "ad"))
    hf = from_pretrained(tmp_path / "ad")
    layer = hf.model.layers[0].mlp.up_proj
    assert isinstance(layer, NestedLinear) and layer.level == 1 and layer.damage is not None
    assert torch.equal(logits(hf), ref)
    hf.generate(IDS[:1, :4], max_new_tokens=2, do_sample=False)

    # switch down in memory, then save_pretrained records the level the layers are at now
    adapt(hf, levels={name: 0 for name in nested_layers(hf)})
    low = logits(hf)
    hf.save_pretrained(tmp_path / "low")
    layers = json.loads((tmp_path / "low" / "config.json").read_text())["quantization_config"]["layers"]
    assert all(entry["nested"]["residuals"] == [] for entry in layers.values())
    assert torch.equal(logits(from_pretrained(tmp_path / "low")), low)


def test_dequantize_gives_plain_linears(tmp_path):
    ampq.save(ampq.quantize(tiny_llama(), "int8-ch", progress=False), tmp_path / "m")
    hf = from_pretrained(tmp_path / "m")
    with kernels.use("reference"):  # decode, then matmul: what the dequantized model computes
        ref = logits(hf)
    hf = hf.dequantize()
    assert type(hf.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not hasattr(hf.config, "quantization_config")
    assert torch.allclose(logits(hf), ref, atol=1e-4, rtol=1e-4)


def test_unquantized_model_gets_no_quantization_config(tmp_path):
    ampq.save(tiny_llama(), tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert torch.equal(logits(from_pretrained(tmp_path / "plain")), logits(ampq.load(tmp_path / "plain")))


def test_old_checkpoint_without_quantization_config_still_loads(tmp_path, monkeypatch):
    import ampq.layer_table

    model = ampq.quantize(tiny_llama(), "int4-g32", progress=False)
    monkeypatch.setattr(ampq.layer_table, "config_json", lambda m: m.config.to_json_string())  # as ampq wrote before
    ampq.save(model, tmp_path / "old")
    assert "quantization_config" not in json.loads((tmp_path / "old" / "config.json").read_text())
    assert torch.equal(logits(ampq.load(tmp_path / "old")), logits(model))


def test_ampq_load_ignores_the_quantization_config(tmp_path):
    ampq.save(ampq.quantize(tiny_llama(), "int4-g32", progress=False), tmp_path / "m")
    loaded = ampq.load(tmp_path / "m")
    assert not hasattr(loaded.config, "quantization_config") and getattr(loaded, "hf_quantizer", None) is None


def test_a_model_loaded_by_from_pretrained_saves_with_ampq_save(tmp_path):
    ampq.save(ampq.quantize(tiny_llama(), "nf4-b32-dq", progress=False), tmp_path / "m")
    hf = from_pretrained(tmp_path / "m")
    ampq.save(hf, tmp_path / "resaved")
    assert torch.equal(logits(ampq.load(tmp_path / "resaved")), logits(hf))


def test_config_that_does_not_match_the_tensors_is_refused(tmp_path):
    ampq.save(ampq.quantize(tiny_llama(), "int4-g32", progress=False), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["format"] = "int8-ch"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="int8-ch needs"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(AmpqError, match="config.json"):  # ampq.load verifies every file
        ampq.load(tmp_path / "m")


def test_from_pretrained_does_not_quantize_on_the_fly(tmp_path):
    from ampq.hf import AmpqConfig

    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=AmpqConfig())


@pytest.mark.slow
def test_real_model_int4_loads_both_ways(tmp_path):
    model, tok = ampq.load_model("smollm2-135m")  # its own copy: quantizing changes the model in place
    model = ampq.quantize(model, "int4-g64", progress=False)  # round to nearest
    ampq.save(model, tmp_path / "smol", tok)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ampq.load(tmp_path / "smol")(ids).logits
        hf = from_pretrained(tmp_path / "smol")
        assert torch.equal(hf(ids).logits, ref)
    hf.generate(ids, max_new_tokens=3, do_sample=False)
