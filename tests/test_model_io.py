"""Quantize, save and load real and small models; refuse damaged checkpoints by name."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ampq
from ampq import AmpqError, QuantLinear
from ampq.report import linear_bits, model_bytes


def tiny_llama(tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("fmt", ["int4-g32", "int3-g64-sym", "nf4-b32-dq", "fp8-e4m3-ch", "e2m1-g32", "int8-ch",
                                 "nvfp4", "mxfp4"])
def test_save_load_gives_identical_logits(tmp_path, fmt):
    model = ampq.quantize(tiny_llama(), fmt, progress=False)
    before = logits(model)
    ampq.save(model, tmp_path / "ckpt")
    loaded = ampq.load(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), before)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie survives
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)


def test_a_float32_model_loads_as_float32_though_scales_are_fp16(tmp_path):
    # the fp16 scales of the quantized layers outnumber the float32 tensors; they must not decide
    ampq.save(ampq.quantize(tiny_llama(), "int4-g32"), tmp_path / "m")
    model = ampq.load(tmp_path / "m")
    assert model.config.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32


def test_only_decoder_linears_are_quantized_unless_asked():
    model = ampq.quantize(tiny_llama(), "int4-g32", progress=False)
    q = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(q) == 2 * 7 and not any("lm_head" in n for n in q)
    head = ampq.quantize(tiny_llama(tie=True), "int8-ch", lm_head=True, progress=False)
    assert isinstance(head.lm_head, QuantLinear)
    assert head.config.tie_word_embeddings is False


def test_per_module_format_map(tmp_path):
    model = ampq.quantize(tiny_llama(), {"*.mlp.down_proj": "int8-ch", "*.self_attn.*": None,
                                         "*": "int4-g32"}, progress=False)
    assert model.model.layers[0].mlp.down_proj.format_name == "int8-ch"
    assert model.model.layers[0].mlp.up_proj.format_name == "int4-g32"
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    ampq.save(model, tmp_path / "mixed")
    assert torch.equal(logits(ampq.load(tmp_path / "mixed")), logits(model))


def test_quantized_output_is_close_to_the_original():
    model = tiny_llama()
    ref = logits(model)
    q8 = logits(ampq.quantize(tiny_llama(), "int8-ch", progress=False))
    q3 = logits(ampq.quantize(tiny_llama(), "int3-g32", progress=False))
    err8, err3 = (q8 - ref).abs().mean(), (q3 - ref).abs().mean()
    assert err8 < 0.02 * ref.abs().mean() and err8 < err3


def test_accounting_equals_bytes_saved(tmp_path):
    model = ampq.quantize(tiny_llama(tie=False), "int3-g64", progress=False)
    ampq.save(model, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "ampq.json").read_text())
    stored = sum(t.numel() * t.element_size() for t in
                 ampq.io.checkpoint.read_checkpoint(tmp_path / "c")[0].values())
    assert stored == model_bytes(model)
    for name, entry in manifest["layers"].items():
        layer = model.get_submodule(name)
        assert entry["bytes"] == layer.format.nbytes(layer.shape) == layer.nbytes()
    q_bits = sum(e["bytes"] for e in manifest["layers"].values()) * 8
    q_weights = sum(e["shape"][0] * e["shape"][1] for e in manifest["layers"].values())
    assert linear_bits(model) == pytest.approx(q_bits / q_weights)


def test_nan_weights_are_refused_with_the_layer_name():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(AmpqError, match=r"model\.layers\.1\.mlp\.up_proj has 1 NaN/Inf"):
        ampq.quantize(model, "int4-g32", progress=False)


def test_unknown_format_fails_before_any_work():
    model = tiny_llama()
    with pytest.raises(AmpqError, match="unknown format"):
        ampq.quantize(model, "int4-g128x", progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.fixture
def saved(tmp_path):
    model = ampq.quantize(tiny_llama(), "int4-g32", progress=False)
    ampq.save(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _refused(path, match):
    with pytest.raises(AmpqError, match=match) as info:
        ampq.load(path)
    assert "\n" not in str(info.value)


def test_missing_shard_refused(saved):
    (saved / "model.safetensors").unlink()
    _refused(saved, "model.safetensors")


def test_truncated_shard_refused(saved):
    p = saved / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    _refused(saved, "model.safetensors.*truncated")


def test_altered_shard_refused(saved):
    p = saved / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))
    _refused(saved, "model.safetensors")


def test_altered_config_refused(saved):
    p = saved / "config.json"
    p.write_text(p.read_text().replace('"hidden_size": 96', '"hidden_size": 97'))
    _refused(saved, "config.json")


def test_manifest_that_disagrees_with_shards_refused(saved):
    p = saved / "ampq.json"
    manifest = json.loads(p.read_text())
    manifest["layers"]["model.layers.0.mlp.up_proj"]["tensors"].append("absmax")
    p.write_text(json.dumps(manifest))
    _refused(saved, "up_proj")


def test_not_a_checkpoint_refused(tmp_path):
    _refused(tmp_path, "ampq.json")
    _refused(tmp_path / "nowhere", "nowhere")
