"""Checkpoints quantized by other tools load as ampq models that compute what the tools' own loaders
compute. The fixtures (tests/fixtures/peers/) were made by the peer libraries themselves
(make_fixtures.py there): AutoGPTQ's packer, AutoAWQ's packer, llm-compressor, bitsandbytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ampq
from ampq import kernels
from ampq.errors import AmpqError
from ampq.importers import load_foreign, quant_method
from ampq.importers.packing import unpack_int32
from ampq.nn import QuantLinear, quantized_linears

PEERS = Path(__file__).parent / "fixtures" / "peers"
# (fixture, the ampq format of layers.1.mlp.down_proj, activation mode)
CASES = [
    ("gptq-int4-g64-asym", "int4-g64-zp", None),
    ("gptq-int3-g32-sym", "int3-g32-sym", None),
    ("gptq-int4-g32-sym-actorder", "int4-g32-sym", None),
    ("awq-int4-g64", "int4-g64-zp", None),
    ("ct-w4a16", "int4-g128-sym", None),
    ("ct-w4a16-asym", "int4-g128-zp", None),
    ("ct-w8a16", "int8-g128-sym", None),
    ("ct-fp8-dynamic", "fp8-e4m3-ch", "fp8-e4m3-token"),
    ("bnb-nf4-dq", "nf4-b64-dq", None),
    ("bnb-fp4", "fp4-b64", None),
]


def _reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(PEERS / f"{name}.reference.safetensors"))


def _load(name: str):
    ref = _reference(name)
    dtype = ref["weight.model.layers.1.mlp.down_proj"].dtype  # the dtype the peer computed in
    model, notes = load_foreign(PEERS / name, dtype=dtype)
    return model, notes, ref


@pytest.mark.parametrize("name,down_format,activation", CASES)
def test_peer_weights_decode_bit_for_bit(name, down_format, activation):
    model, notes, ref = _load(name)
    assert notes == []  # every conversion exact
    layers = quantized_linears(model)
    assert len(layers) == 14  # every linear of both blocks; lm_head stays tied to the embedding
    assert model.get_submodule("model.layers.1.mlp.down_proj").format_name == down_format
    assert all(layer.activation == activation for layer in layers.values())
    for key, peer_weight in ref.items():
        if key.startswith("weight."):
            ours = model.get_submodule(key.removeprefix("weight.")).dequantize(peer_weight.dtype)
            assert torch.equal(ours, peer_weight), key


@pytest.mark.parametrize("name,down_format,activation", CASES)
def test_peer_logits_match_the_peer_loader(name, down_format, activation):
    model, _, ref = _load(name)
    if activation is not None:  # compressed-tensors' CPU fake-quantization rounds activations its own way
        for layer in quantized_linears(model).values():
            layer.activation = None
        expected = ref["logits_weights_only"]
    else:
        expected = ref["logits"]
    # the reference kernel (decode, then matmul) is the peers' own arithmetic; ampq's packed CPU
    # kernels are tested against it in test_kernels_cpu.py
    with torch.no_grad(), kernels.use("reference"):
        logits = model(ref["input_ids"]).logits.float()
    # Same weights, so what differs is rounding: a peer and ampq may sum in another order, so an
    # activation near a rounding boundary lands one unit apart, and that unit travels on. Each of the
    # ~14 roundings to the model's dtype per block (norms, projections, attention, activation,
    # residuals) can add one unit roundoff, independently: relative RMS <= u * sqrt(roundings).
    # A decoding error (a wrong code or scale) moves logits by far more than this.
    u = torch.finfo(model.dtype).eps / 2
    roundings = 14 * model.config.num_hidden_layers + 2  # + final norm and head
    assert (logits - expected).abs().max().item() <= 4 * 2 * u * max(2.0, expected.abs().max().item())
    assert ((logits - expected).pow(2).mean() / expected.pow(2).mean()).sqrt().item() <= u * roundings ** 0.5


def test_fp8_dynamic_activations_are_quantized_per_token():
    model, _, ref = _load("ct-fp8-dynamic")
    with torch.no_grad():
        on = model(ref["input_ids"]).logits.float()
    for layer in quantized_linears(model).values():
        layer.activation = None
    with torch.no_grad():
        off = model(ref["input_ids"]).logits.float()
    peer_effect = (ref["logits"] - ref["logits_weights_only"]).pow(2).mean().sqrt()
    ours = (on - off).pow(2).mean().sqrt()
    assert ours > 0.5 * peer_effect and ours < 2 * peer_effect  # the same rounding, not the same bits


def test_imported_model_saves_and_reloads_as_ampq(tmp_path):
    model, _, ref = _load("gptq-int4-g64-asym")
    ampq.save(model, tmp_path / "ckpt")
    again = ampq.load(tmp_path / "ckpt")
    with torch.no_grad():
        a, b = model(ref["input_ids"]).logits, again(ref["input_ids"]).logits
    assert torch.equal(a, b)
    entry = json.loads((tmp_path / "ckpt" / "ampq.json").read_text())["layers"]["model.layers.0.mlp.up_proj"]
    assert entry["format"] == "int4-g64-zp" and entry["algorithm"] == "gptq"


def test_ampq_load_and_load_model_accept_foreign_folders():
    model = ampq.load(PEERS / "awq-int4-g64")
    assert model.dtype == torch.float16  # as stored
    assert isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"), QuantLinear)
    model, tok = ampq.load_model(str(PEERS / "bnb-nf4-dq"))
    assert model.dtype == torch.float32 and tok is None  # load_model's float32 default; no tokenizer saved
    assert quant_method(PEERS / "ct-w4a16") == "compressed-tensors"


def test_zero_point_exports_to_compressed_tensors_exactly(tmp_path):
    pytest.importorskip("compressed_tensors")
    from ampq.exporters import export_compressed_tensors

    model, _, ref = _load("ct-w4a16-asym")
    ampq.save(model, tmp_path / "ckpt")
    summary = export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    assert "exact" in summary["line"]
    back, notes = load_foreign(tmp_path / "ct", dtype=torch.bfloat16)
    for name, layer in quantized_linears(model).items():
        assert torch.equal(back.get_submodule(name).dequantize(), layer.dequantize()), name


# ---- bad input ---------------------------------------------------------------------------------------


def _copy(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(PEERS / name, out)
    return out


def test_unknown_quant_method_is_named(tmp_path):
    folder = _copy("gptq-int3-g32-sym", tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "exl2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AmpqError, match="'exl2' is not one ampq imports"):
        load_foreign(folder)


def test_act_order_gptq_keeps_its_groups_through_a_permutation(tmp_path):
    model, _, ref = _load("gptq-int4-g32-sym-actorder")
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.input_perm is not None
    x = torch.randn(3, 128, dtype=torch.float16)
    with kernels.use("reference"):
        expected = layer(x.float()).float()
    assert torch.allclose(layer(x.float()).float(), expected, rtol=2e-2, atol=2e-2)  # packed kernel, permuted x
    ampq.save(model, tmp_path / "ckpt")
    again = ampq.load(tmp_path / "ckpt")
    assert torch.equal(again.get_submodule("model.layers.0.self_attn.q_proj").dequantize(), layer.dequantize())
    from ampq.exporters.gguf import export_gguf

    with pytest.raises(AmpqError, match="act-order"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")


def test_g_idx_with_uneven_groups_is_refused(tmp_path):
    folder = _copy("gptq-int4-g64-asym", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[key] = torch.cat([torch.zeros(100), torch.ones(28)]).to(torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(AmpqError, match="q_proj.*does not put 64 inputs in each group"):
        load_foreign(folder)


def test_corrupt_safetensors_is_named(tmp_path):
    folder = _copy("awq-int4-g64", tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AmpqError, match="not a readable safetensors file"):
        load_foreign(folder)


def test_pickle_only_folder_is_refused(tmp_path):
    folder = _copy("awq-int4-g64", tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(AmpqError, match="pickle files"):
        load_foreign(folder)


def test_wrong_shapes_name_the_layer(tmp_path):
    folder = _copy("ct-w4a16", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight_scale"
    tensors[key] = tensors[key][:, :1].contiguous()[:100]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(AmpqError, match="down_proj"):
        load_foreign(folder)


def test_bnb_int8_is_refused_with_the_reason(tmp_path):
    folder = _copy("bnb-fp4", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj."
    for k in [k for k in tensors if k.startswith(prefix)]:
        del tensors[k]
    tensors[prefix + "weight"] = torch.zeros(128, 128, dtype=torch.int8)
    tensors[prefix + "SCB"] = torch.ones(128)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(AmpqError, match="8-bit"):
        load_foreign(folder)


def test_bitstream_unpacking_straddles_words():
    codes = torch.randint(0, 8, (64, 3), dtype=torch.int32)
    bits = torch.zeros(6, 3, dtype=torch.int64)  # 64 codes x 3 bits = 6 words
    for i in range(64):
        for b in range(3):
            bit = (codes[i] >> b) & 1
            pos = 3 * i + b
            bits[pos // 32] |= bit.long() << (pos % 32)
    words = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    assert torch.equal(unpack_int32(words, 3, 64), codes)


def test_act_order_import_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, ref = _load("gptq-int4-g32-sym-actorder")
    ampq.save(model, tmp_path / "ckpt")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    layer = again.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.input_perm is not None
    with torch.no_grad(), kernels.use("reference"):
        assert torch.equal(again(ref["input_ids"]).logits, model(ref["input_ids"]).logits)


def _compressed_by_compressed_tensors(folder: Path, preset_name: str):
    """A tiny random Llama quantized (round to nearest, with compressed-tensors' own scale
    arithmetic: generate_gparam, calculate_qparams) and compressed by compressed-tensors itself."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    from test_model_io import tiny_llama

    model = tiny_llama(tie=False)
    qconfig = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                              **PRESET_SCHEMES[preset_name])},
                                 ignore=["lm_head"])
    apply_quantization_config(model, qconfig)
    original = {}
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None:
            continue
        w = m.weight.detach()
        original[name] = w.clone()
        groups = w.reshape(w.shape[0], -1, scheme.weights.group_size)
        glob = generate_gparam(w.amin().reshape(1), w.amax().reshape(1)) if hasattr(m, "weight_global_scale") else None
        scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=glob)
        m.weight_scale.data.copy_(scale)
        if glob is not None:
            m.weight_global_scale.data.copy_(glob)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    compressor.update_config(str(folder))
    return original


@pytest.mark.parametrize("preset,fmt", [("NVFP4A16", "nvfp4"), ("MXFP4A16", "mxfp4")])
def test_fp4_checkpoint_compressed_by_compressed_tensors_imports_identically(tmp_path, preset, fmt):
    from transformers import AutoModelForCausalLM

    original = _compressed_by_compressed_tensors(tmp_path / "ct", preset)
    model, notes = load_foreign(tmp_path / "ct")
    assert not notes
    from test_model_io import logits

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16)
    logits(theirs)  # the first forward pass decompresses the weights, by the library's own code
    layers = quantized_linears(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert layer.format_name == fmt
        assert torch.equal(layer.dequantize(), theirs.get_submodule(name).weight.detach().float()), name
        # and ampq's own round to nearest of the same float32 weight stores the same bytes (q/k/v and
        # gate/up aside for NVFP4: ampq gives fused layers one global scale, as llm-compressor does)
        if fmt == "mxfp4" or name.endswith(("o_proj", "down_proj")):
            ours = ampq.formats.get_format(fmt).quantize(original[name])
            assert all(torch.equal(ours[k], v) for k, v in layer.stored().items()), name
