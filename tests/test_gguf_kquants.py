"""llama.cpp's K-quants and IQ4 types through `ampq export --to gguf` and back: written as the blocks
ampq stores (no re-quantization), read by gguf-py and transformers' GGUF loader with ampq's weights
bit for bit, and read back by ampq's GGUF importer into the same formats."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import ampq  # noqa: E402
from ampq.export.gguf import export_gguf  # noqa: E402
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


def test_architectures_not_yet_written_are_refused_saying_why(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from ampq import AmpqError

    model = _tiny(Gemma2ForCausalLM, Gemma2Config, head_dim=64)
    ampq.save(ampq.quantize(model, "q4_k", progress=False), tmp_path / "ckpt")
    with pytest.raises(AmpqError, match="Gemma2ForCausalLM.*norm weights stored plus one"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
