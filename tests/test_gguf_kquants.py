"""llama.cpp's K-quants and IQ4 types through `ampq export --to gguf` and back: written as the blocks
ampq stores (no re-quantization), read by gguf-py and transformers' GGUF loader with ampq's weights
bit for bit, and read back by ampq's GGUF importer into the same formats."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import ampq  # noqa: E402
from ampq.exporters.gguf import export_gguf  # noqa: E402
from ampq.nn import QuantLinear, quantized_linears  # noqa: E402
from ampq.pipeline.targets import TARGETS  # noqa: E402
from test_export_gguf import _gguf_weights, _gguf_name, _load_gguf, _reference_logits  # noqa: E402

torch.set_num_threads(1)
T = gguf.GGMLQuantizationType
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

# inputs of 256 (hidden) and 512 (the MLP's): whole K-quant blocks everywhere
MIXED = {"*q_proj": "q3_k", "*k_proj": "iq4_xs", "*v_proj": "q6_k", "*o_proj": "q5_k",
         "*gate_proj": "q4_k", "*up_proj": "iq4_nl", "*down_proj": "q2_k"}


def _tiny(cls, config_cls, **extra):
    torch.manual_seed(0)
    cfg = config_cls(**{"vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                        "tie_word_embeddings": False, **extra})
    return cls(cfg).eval()


def _export(tmp_path, model, spec):
    model = ampq.quantize(model, spec, progress=False)
    ampq.save(model, tmp_path / "ckpt")
    model = ampq.load(tmp_path / "ckpt")
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    return model, summary


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_k_quant_layers_are_written_as_stored_and_decode_bit_for_bit(tmp_path, arch):
    model = (_tiny(LlamaForCausalLM, LlamaConfig) if arch == "llama" else _tiny(Qwen2ForCausalLM, Qwen2Config))
    model, summary = _export(tmp_path, model, MIXED)
    assert summary["exact"] == summary["layers"] == 14
    assert summary["types"] == {t.upper(): 2 for t in MIXED.values()}
    weights = _gguf_weights(tmp_path / "m.gguf", model.config, llama=arch == "llama")
    for name, layer in quantized_linears(model).items():
        qtype, w = weights[_gguf_name(name)]
        assert qtype == T[layer.format_name.upper()]
        assert torch.equal(w, layer.dequantize()), name  # q/k rows permuted whole, back exactly
    loaded = _load_gguf(tmp_path / "m.gguf")
    with torch.no_grad():
        diff = float((loaded(IDS).logits - _reference_logits(model, IDS)).abs().max())
    assert diff <= 1e-5


def test_the_file_type_is_the_most_common_k_quant(tmp_path):
    _, summary = _export(tmp_path, _tiny(LlamaForCausalLM, LlamaConfig), {"*down_proj": "q6_k", "*": "q4_k"})
    assert summary["file_type"] == "MOSTLY_Q4_K_M"
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def test_k_quant_layers_load_back_as_the_same_blocks(tmp_path):
    from ampq.importers.gguf import keep_quantized

    model, _ = _export(tmp_path, _tiny(LlamaForCausalLM, LlamaConfig), MIXED)
    back = _load_gguf(tmp_path / "m.gguf")
    assert keep_quantized(back, tmp_path / "m.gguf") == []
    ours, theirs = quantized_linears(model), quantized_linears(back)
    assert set(theirs) == set(ours)
    for name, layer in theirs.items():
        assert isinstance(layer, QuantLinear) and layer.format_name == ours[name].format_name
        assert torch.equal(layer.stored()["blocks"], ours[name].stored()["blocks"]), name  # byte for byte
    assert torch.equal(_reference_logits(back, IDS), _reference_logits(model, IDS))


def test_the_llama_cpp_target_weighs_its_own_types():
    candidates = TARGETS["llama.cpp"][1]
    for name in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"):
        assert any(c.split(":")[0] == name for c in candidates), name


def test_a_llama_cpp_plan_with_k_quants_exports_with_no_layer_changed(tmp_path):
    model = _tiny(LlamaForCausalLM, LlamaConfig)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    ampq.quantize(model, ampq.Budget(bits=4.5, target="llama.cpp", estimator="hessian",
                                     sensitivity=str(tmp_path / "sens.json")),
                  calibration=calib, output=tmp_path / "ckpt", progress=False)
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert summary["exact"] == summary["layers"]
    assert any(t in summary["types"] for t in ("Q4_K", "Q3_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q2_K"))
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert all(np.isfinite(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).all() for t in reader.tensors)


# ---- architectures by llama.cpp's own tables ------------------------------------------------------


def _arch_model(name):
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if name == "mistral":
        return _tiny(MistralForCausalLM, MistralConfig, sliding_window=None)
    # transformers' GGUF reader takes Qwen3's head size to be its default, 128 (it reads no key_length)
    return _tiny(Qwen3ForCausalLM, Qwen3Config, head_dim=128, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.parametrize("arch, gguf_arch", [("mistral", "llama"), ("qwen3", "qwen3")])
def test_more_architectures_round_trip_through_transformers(tmp_path, arch, gguf_arch):
    model, summary = _export(tmp_path, _arch_model(arch), {"*mlp*": "q4_k", "*": "int8-g32-sym"})
    assert summary["architecture"] == gguf_arch and summary["exact"] == summary["layers"]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = reader.fields
    assert fields["general.architecture"].contents() == gguf_arch
    assert fields[f"{gguf_arch}.block_count"].contents() == 2
    names = {t.name for t in reader.tensors}
    if arch == "qwen3":  # its per-head q/k norms, by gguf-py's names
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    loaded = _load_gguf(tmp_path / "m.gguf")
    with torch.no_grad():
        diff = float((loaded(IDS).logits - _reference_logits(model, IDS)).abs().max())
    assert diff <= 1e-5


def _gemma_phi_export(tmp_path, arch, **overrides):
    from _tiny_models import VOCAB, tiny_model, tiny_tokenizer

    model = ampq.quantize(tiny_model(arch, **overrides), "q4_k", progress=False)
    ampq.save(model, tmp_path / "ckpt", tiny_tokenizer(VOCAB))
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    return model, summary, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}, tensors


def test_gemma2_file_carries_what_llama_cpp_reads(tmp_path):
    """As llama.cpp's Gemma2Model converter writes it: soft-capping and window keys, head size, norms
    plus one (transformers scales by 1 + w), no output tensor (the embeddings are the head)."""
    model, summary, keys, tensors = _gemma_phi_export(tmp_path, "gemma2")
    assert summary["architecture"] == "gemma2" and summary["exact"] == summary["layers"] == 14
    assert {k: keys[f"gemma2.{k}"] for k in ("attn_logit_softcapping", "final_logit_softcapping",
                                             "attention.sliding_window", "attention.key_length")} == \
        {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "attention.sliding_window": 16,
         "attention.key_length": 64}
    layer = model.model.layers[1]
    for name, norm in [("blk.1.attn_norm", layer.input_layernorm), ("blk.1.post_attention_norm",
                       layer.post_attention_layernorm), ("blk.1.ffn_norm", layer.pre_feedforward_layernorm),
                       ("blk.1.post_ffw_norm", layer.post_feedforward_layernorm), ("output_norm", model.model.norm)]:
        assert np.array_equal(np.asarray(tensors[f"{name}.weight"].data), (norm.weight.detach() + 1).numpy()), name
    assert "output.weight" not in tensors


def test_gemma3_file_carries_what_llama_cpp_reads(tmp_path):
    model, summary, keys, tensors = _gemma_phi_export(tmp_path, "gemma3-linear")
    assert summary["architecture"] == "gemma3" and summary["exact"] == summary["layers"] == 42
    assert keys["gemma3.rope.freq_base"] == 1e6 and keys["gemma3.attention.sliding_window"] == 16
    assert keys["gemma3.rope.scaling.type"] == "linear" and keys["gemma3.rope.scaling.factor"] == 8.0
    q_norm = model.model.layers[0].self_attn.q_norm.weight.detach()  # per-head q/k norms are shifted too
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q_norm.weight"].data), (q_norm + 1).numpy())
    assert "output.weight" in tensors  # gemma3 has one: this head is untied


def test_phi3_file_carries_what_llama_cpp_reads(tmp_path):
    """Phi-3's fused q/k/v and gate/up linears are llama.cpp's attn_qkv and ffn_up as they are (llama.cpp
    splits them), and a quarter of each head is left unrotated."""
    model, summary, keys, tensors = _gemma_phi_export(tmp_path, "phi3")
    assert summary["architecture"] == "phi3" and summary["exact"] == summary["layers"] == 8
    assert keys["phi3.rope.dimension_count"] == 48 and keys["phi3.attention.sliding_window"] == 0
    assert keys["phi3.rope.scaling.original_context_length"] == 4096
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [256, 512]  # gguf-py lists (inputs, outputs)
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [256, 1024]
    decoded = gguf.quants.dequantize(np.asarray(tensors["blk.1.ffn_up.weight"].data), T.Q4_K)
    assert torch.equal(torch.from_numpy(decoded.copy()), model.model.layers[1].mlp.gate_up_proj.dequantize())


@pytest.mark.parametrize("arch, overrides, match", [
    ("gemma2", {"tie_word_embeddings": False}, "output head is not the embedding table"),
    ("gemma2", {"query_pre_attn_scalar": 256}, "query_pre_attn_scalar 256.*uses 64"),
    ("gemma3", {"layer_types": ["sliding_attention", "full_attention"] * 3}, "every 6th layer global"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}},
     "base 50000.*uses 10000"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 24,
                                  "long_factor": [2.0] * 24, "original_max_position_embeddings": 64}},
     r"rope scaling \(longrope\)"),
])
def test_what_llama_cpp_would_run_differently_is_refused(tmp_path, arch, overrides, match):
    from ampq import AmpqError
    from _tiny_models import tiny_model

    ampq.save(ampq.quantize(tiny_model(arch, **overrides), "q4_k", progress=False), tmp_path / "ckpt")
    with pytest.raises(AmpqError, match=match):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
