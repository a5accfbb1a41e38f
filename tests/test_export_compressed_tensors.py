"""`ampq export --to compressed-tensors`: the export loads back through transformers' own
compressed-tensors integration with the weights ampq decodes, bit for bit, where the format maps
exactly; the rest is refused in one error, or re-quantized with `nearest` and its cost reported."""

import json

import pytest

pytest.importorskip("compressed_tensors")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

import ampq  # noqa: E402
from ampq import AmpqError  # noqa: E402
from ampq.cli import main  # noqa: E402
from ampq.exporters import export_compressed_tensors  # noqa: E402
from ampq.nn import quantized_linears  # noqa: E402
from test_model_io import logits, tiny_llama  # noqa: E402

torch.set_num_threads(1)

# Exact exports give the same decoded weights, so the logits of transformers' model and of ampq's
# reference kernel (decode, then a dense matmul in float32) agree to float32 rounding; measured:
# identical (0.0) for every case below. ampq's default CPU kernel runs in bf16 and differs by ~3e-3.
EXACT_ATOL = 1e-5


def _quantized(tmp_path, spec, name="ampq", **kwargs):
    model = ampq.quantize(tiny_llama(), spec, progress=False, **kwargs)
    ampq.save(model, tmp_path / name)
    return ampq.load(tmp_path / name)


def _reference_logits(model):
    with ampq.kernels.use("reference"):
        return logits(model)


def _max_weight_change(loaded, model):
    return max(float((loaded.get_submodule(n).weight.detach().float() - m.dequantize()).abs().max())
               for n, m in quantized_linears(model).items())


def _decompress_with_compressed_tensors(out):
    """The export read back by compressed-tensors alone: each linear matched to its config group
    by the library's matcher and decompressed by that group's compressor, into a plain model."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match
    from safetensors.torch import load_file

    qconfig = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).eval()
    tensors = load_file(out / "model.safetensors")
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        schemes = [s for s in qconfig.config_groups.values() if is_match(name, module, s.targets, qconfig.ignore)]
        assert len(schemes) <= 1
        if schemes:
            local = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors) if k.rpartition(".")[0] == name}
            bias = local.pop("bias", None)
            compressor = BaseCompressor.get_value_from_registry(schemes[0].format)
            tensors[f"{name}.weight"] = compressor.decompress(local, schemes[0])["weight"].float()
            if bias is not None:
                tensors[f"{name}.bias"] = bias
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


# int4-g64-sym: 96 and 160 inputs end in a partial group of 32, written as groups of 32 (gcd)
@pytest.mark.parametrize("spec", ["int4-g32-sym", "int4-g64-sym", "int8-ch-sym",
                                  {"*mlp*": "int8-ch-sym", "*": "int4-g32-sym"}, "fp8-e4m3-ch", "fp8-e4m3",
                                  "nvfp4", "mxfp4"])
def test_exact_export_loads_in_transformers_with_the_same_weights(tmp_path, spec):
    model = _quantized(tmp_path, spec)
    summary = export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct")
    assert summary["layers"] == summary["exact"] == 14 and not summary["converted"]
    assert summary["ignore"] == ["lm_head"]
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert len(qc["config_groups"]) == (2 if isinstance(spec, dict) else 1)
    if not isinstance(spec, dict):  # one scheme: every linear but the ignored head, as llm-compressor writes it
        assert qc["config_groups"]["group_0"]["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    if isinstance(spec, dict):  # the MLP's three linears in one group, the attention's four in the other
        by_bits = {g["weights"]["num_bits"]: g for g in qc["config_groups"].values()}
        assert all("mlp" in t for t in by_bits[8]["targets"]) and by_bits[8]["weights"]["strategy"] == "channel"
        assert by_bits[4]["weights"] == {**by_bits[4]["weights"], "group_size": 32, "strategy": "group",
                                         "symmetric": True}
    assert not list(tmp_path.glob(".ct*"))  # no temporary folder left

    if spec in ("nvfp4", "mxfp4"):  # compressed-tensors decompresses FP4 to bf16 weights, so run in bf16
        assert any("bfloat16" in w for w in summary["warnings"])
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16)
        logits(loaded)
        assert _max_weight_change(loaded, model) == 0.0
        return
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    got = logits(loaded)  # the first forward pass decompresses the weights
    ref = _reference_logits(model)
    assert (got - ref).abs().max() <= EXACT_ATOL
    assert _max_weight_change(loaded, model) == 0.0  # the same codes and scales: every weight bit for bit


@pytest.mark.parametrize("spec,algorithm", [("nvfp4", "rtn"), ("mxfp4", "rtn"), ({"*mlp*": "mxfp4", "*": "nvfp4"}, "rtn"),
                                            ("nvfp4", "gptq")])
def test_fp4_export_decompresses_with_compressed_tensors_to_ampqs_weights(tmp_path, spec, algorithm):
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2)) if algorithm == "gptq" else None
    model = _quantized(tmp_path, spec, algorithm=algorithm, calibration=calibration)
    export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    formats = {g["format"] for g in qc["config_groups"].values()}
    assert formats == ({f"{spec}-pack-quantized"} if isinstance(spec, str) else {"nvfp4-pack-quantized",
                                                                                 "mxfp4-pack-quantized"})
    assert qc["format"] == (formats.pop() if len(formats) == 1 else "mixed-precision")
    plain = _decompress_with_compressed_tensors(tmp_path / "ct")
    for name, layer in quantized_linears(model).items():
        assert torch.equal(plain.get_submodule(name).weight.detach().float(), layer.dequantize()), name
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    for block in ("model.layers.0", "model.layers.1"):  # vLLM fuses q/k/v: one NVFP4 global scale for the three
        scales = [tensors.get(f"{block}.self_attn.{p}.weight_global_scale") for p in ("q_proj", "k_proj", "v_proj")]
        if scales[0] is not None:
            assert torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])


def test_fused_layers_with_different_nvfp4_global_scales_are_refused(tmp_path):
    from ampq.nn import QuantLinear
    model = ampq.quantize(tiny_llama(), "nvfp4", progress=False)
    k = model.model.layers[0].self_attn.k_proj  # as quantized alone (older checkpoints, --untied runs)
    alone = ampq.formats.get_format("nvfp4").quantize(k.dequantize() * 3)
    model.model.layers[0].self_attn.k_proj = QuantLinear(k.in_features, k.out_features, "nvfp4", alone)
    ampq.save(model, tmp_path / "ampq")
    with pytest.raises(AmpqError, match="one NVFP4 global scale"):
        export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct")


def test_a_resaved_checkpoint_exports_in_the_dtype_of_its_weights(tmp_path):
    # ampq.load infers the dtype from the most common stored one (here the fp16 scales), so a
    # re-saved config says float16 over float32 weights; the export writes what it writes.
    model = _quantized(tmp_path, "int4-g32-sym")
    ampq.save(model, tmp_path / "again")
    export_compressed_tensors(tmp_path / "again", tmp_path / "ct")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert loaded.dtype == torch.float32
    assert (logits(loaded) - _reference_logits(model)).abs().max() <= EXACT_ATOL


def test_fp8_w8a8_keeps_its_per_token_activations(tmp_path):
    model = _quantized(tmp_path, "fp8-e4m3-ch", activation="fp8-e4m3-token")
    export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct")
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "float-quantized"
    assert group["input_activations"] | {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True} \
        == group["input_activations"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert (logits(loaded) - _reference_logits(model)).abs().max() <= EXACT_ATOL


def test_inexpressible_formats_are_refused_in_one_error(tmp_path):
    _quantized(tmp_path, {"*.mlp.down_proj": "nf4-b32", "*.o_proj": "int3-g32", "*": "int4-g32"})
    with pytest.raises(AmpqError) as err:
        export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct")
    text = str(err.value)
    for fmt in ("int4-g32 (10 layers", "int3-g32 (2 layers", "nf4-b32 (2 layers", "--nearest"):
        assert fmt in text
    assert "\n" not in text
    assert not (tmp_path / "ct").exists() and not list(tmp_path.glob(".ct*"))


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_nearest_requantizes_and_reports_the_cost(tmp_path):
    model = _quantized(tmp_path, "int4-g32")  # asymmetric: fp16 minimums are not integer zero points
    summary = export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct", nearest=True)
    assert summary["exact"] == 0 and len(summary["converted"]) == 14
    assert {c["to"] for c in summary["converted"].values()} == {"int4 group 32 with zero points"}
    scales = torch.cat([m.scale.float().flatten() for m in quantized_linears(model).values()])
    # the decoded weights move by at most half a step (plus fp16 rounding of the refitted step)
    assert 0 < summary["mean_abs_change"] < summary["max_abs_change"] <= 0.51 * float(scales.max())
    # transformers 5 loads asymmetric pack-quantized checkpoints only with dequantize=True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", quantization_config=CompressedTensorsConfig(
        dequantize=True))
    assert _max_weight_change(loaded, model) == pytest.approx(summary["max_abs_change"], rel=1e-6)
    ref = _reference_logits(model)
    assert 0 < (logits(loaded) - ref).abs().max() < 0.1 * ref.abs().max()


def test_nearest_with_mixed_formats(tmp_path):
    model = _quantized(tmp_path, {"*.mlp.down_proj": "nf4-b32", "*.o_proj": "int3-g32-sym", "*": "int8-ch-sym"})
    summary = export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct", nearest=True)
    conv = summary["converted"]
    assert summary["exact"] == 10 and len(conv) == 4
    o = conv["model.layers.0.self_attn.o_proj"]
    assert o["to"] == "int4 group 32 symmetric" and o["max_abs_change"] == 0.0  # int3-sym widens exactly
    assert conv["model.layers.0.mlp.down_proj"]["max_abs_change"] > 0
    assert len(summary["config_groups"]) == 2  # int8 per channel; int4 g32 for o_proj and down_proj
    loaded = _decompress_with_compressed_tensors(tmp_path / "ct")
    assert _max_weight_change(loaded, model) == pytest.approx(summary["max_abs_change"], rel=1e-6)
    ref = _reference_logits(model)
    assert (logits(loaded) - ref).abs().max() < 0.1 * ref.abs().max()


def test_qkv_and_gate_up_must_share_a_scheme(tmp_path):
    _quantized(tmp_path, {"*.k_proj": "int8-ch-sym", "*": "int4-g32-sym"}, "qkv")
    with pytest.raises(AmpqError, match=r"model\.layers\.0\.self_attn: vLLM fuses q_proj/k_proj/v_proj .* "
                                        r"k_proj is int8-ch-sym"):
        export_compressed_tensors(tmp_path / "qkv", tmp_path / "ct")
    _quantized(tmp_path, {"*.up_proj": None, "*": "int4-g32-sym"}, "gate")
    with pytest.raises(AmpqError, match=r"model\.layers\.0\.mlp: .*gate_proj/up_proj.* up_proj is not quantized"):
        export_compressed_tensors(tmp_path / "gate", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    _quantized(tmp_path, "int8-ch-sym")
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "keep.txt").write_text("mine")
    with pytest.raises(AmpqError, match="not empty"):
        export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct")
    assert (tmp_path / "ct" / "keep.txt").read_text() == "mine"
    export_compressed_tensors(tmp_path / "ampq", tmp_path / "ct", overwrite=True)
    assert not (tmp_path / "ct" / "keep.txt").exists() and (tmp_path / "ct" / "model.safetensors").is_file()
    with pytest.raises(AmpqError, match="onto itself"):
        export_compressed_tensors(tmp_path / "ampq", tmp_path / "ampq", overwrite=True)


def test_cli_export(tmp_path, capsys):
    _quantized(tmp_path, {"*mlp*": "int8-ch-sym", "*": "int4-g32-sym"})
    assert main(["export", str(tmp_path / "ampq"), "--to", "compressed-tensors", str(tmp_path / "ct")]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "14 quantized layers (14 exact) in 2 config groups" in line and "bytes" in line
    assert main(["export", str(tmp_path / "ampq"), "--to", "compressed-tensors", str(tmp_path / "ct")]) == 2
    assert "not empty" in capsys.readouterr().err
