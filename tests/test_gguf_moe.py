"""GGUF export of mixture-of-experts checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), one tiny
random model per family: the file read back with gguf-py (llama.cpp's tensor names, shapes and
types; every expert's slice of the 3D tensors dequantizes to ampq's decoded expert bit for bit),
llama.cpp's own logits (where llama-cpp-python is installed) within the measured tolerance of the
dense tests, experts kept unquantized, and the refusals."""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

import ampq  # noqa: E402
from ampq.nn import quantized_linears  # noqa: E402
from ampq.quant_experts import quantized_experts  # noqa: E402
from _tiny_models import tiny_tokenizer  # noqa: E402
from moe_models import tiny_moe  # noqa: E402

torch.set_num_threads(1)
VOCAB = 320
FAMILIES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
# Qwen3-MoE's released configs renormalize the top-k weights, as llama.cpp's qwen3moe always does
# (transformers' default is not to); llama.cpp's olmoe has as many key/value heads as query heads, as OLMoE-1B-7B
ROUTING = {"qwen3_moe": {"norm_topk_prob": True}, "olmoe": {"num_key_value_heads": 4}}
# three block types in one file: experts' gate/up Q4_0, their down Q8_0 (one scale per row), linears Q5_0
SPEC = {"*.experts.gate_up_proj": "int4-g32-sym", "*.experts.down_proj": "int8-ch-sym", "*": "int5-g32-sym"}
TYPES = {"gate_up_proj": T.Q4_0, "down_proj": T.Q8_0}
# K-quants need inputs of 256: a wider Qwen3-MoE
WIDE = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=512, head_dim=64)
K_SPEC = {"*.experts.gate_up_proj": "q4_k", "*.experts.down_proj": "q6_k", "*": "q5_k"}


def _model(family, **overrides):
    return tiny_moe(family, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None,
                    **{**ROUTING.get(family, {}), **overrides})


def _export(tmp_path, family, spec=SPEC, nearest=False, **overrides):
    model = _model(family, **overrides)
    ampq.quantize(model, spec, progress=False)
    ampq.save(model, tmp_path / "ckpt", tiny_tokenizer(VOCAB))
    summary = ampq.export(tmp_path / "ckpt", tmp_path / "m.gguf", to="gguf", nearest=nearest)
    return ampq.load(tmp_path / "ckpt"), summary


def _read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    fields = {k: f.parts[f.data[0]].tolist() for k, f in reader.fields.items() if len(f.data) == 1}
    return tensors, fields


def _dequantized(t) -> np.ndarray:
    """[experts, rows, inputs] (or [rows, inputs]) float32, as llama.cpp decodes the tensor."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def _check_experts(model, tensors, types):
    """Each block's 3D expert tensors: llama.cpp's names, ggml's shape {inputs, rows, experts}, the
    type, and every expert's slice equal to ampq's decoded gate / up / down."""
    blocks = quantized_experts(model)
    assert blocks
    for name, experts in blocks.items():
        bid = int(name.split(".")[2])
        n = experts.num_experts
        for e in range(n):
            gate, up = experts.expert_weight("gate_up_proj", e).chunk(2)
            down = experts.expert_weight("down_proj", e)
            for leaf, expected, projection in (("gate", gate, "gate_up_proj"), ("up", up, "gate_up_proj"),
                                               ("down", down, "down_proj")):
                t = tensors[f"blk.{bid}.ffn_{leaf}_exps.weight"]
                rows, cols = expected.shape
                assert [int(x) for x in t.shape] == [cols, rows, n]
                assert t.tensor_type == types[projection]
                got = torch.from_numpy(_dequantized(t)[e].reshape(rows, cols).copy())
                assert torch.equal(got, expected), (name, leaf, e)
        router = model.get_submodule(name.rpartition(".")[0]).gate.weight
        t = tensors[f"blk.{bid}.ffn_gate_inp.weight"]
        assert t.tensor_type == T.F32 and np.array_equal(np.asarray(t.data).reshape(router.shape), router.numpy())
    assert not any(k.endswith("gate_up_exps.weight") for k in tensors)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_read_back_exactly(tmp_path, family):
    model, summary = _export(tmp_path, family)
    assert summary["exact"] == summary["layers"] and not summary["converted"] and not summary["warnings"]
    assert summary["architecture"] == FAMILIES[family]
    tensors, fields = _read(tmp_path / "m.gguf")
    _check_experts(model, tensors, TYPES)
    arch = FAMILIES[family]
    config = model.config
    assert fields[f"{arch}.expert_count"] == [4] and fields[f"{arch}.expert_used_count"] == [2]
    if family.startswith("qwen"):
        assert fields[f"{arch}.expert_feed_forward_length"] == [config.moe_intermediate_size]
    else:
        assert f"{arch}.expert_feed_forward_length" not in fields
    if family == "qwen2_moe":
        assert fields[f"{arch}.expert_shared_feed_forward_length"] == [config.shared_expert_intermediate_size]
        for leaf, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            t = tensors[f"blk.1.ffn_{leaf}_shexp.weight"]
            layer = model.get_submodule(f"model.layers.1.mlp.shared_expert.{proj}")
            assert t.tensor_type == T.Q5_0
            assert np.array_equal(_dequantized(t), layer.dequantize(torch.float32).numpy())
        t = tensors["blk.1.ffn_gate_inp_shexp.weight"]
        gate = model.get_submodule("model.layers.1.mlp.shared_expert_gate").weight
        assert t.tensor_type == T.F32 and np.array_equal(np.asarray(t.data).reshape(1, -1), gate.numpy())
    experts = sum(1 for name in tensors if "_exps." in name)
    assert experts == 3 * config.num_hidden_layers


def test_k_quant_experts_read_back_exactly(tmp_path):
    model, summary = _export(tmp_path, "qwen3_moe", K_SPEC, **WIDE)
    assert summary["exact"] == summary["layers"]
    tensors, _ = _read(tmp_path / "m.gguf")
    _check_experts(model, tensors, {"gate_up_proj": T.Q4_K, "down_proj": T.Q6_K})


def test_unquantized_experts_are_written_as_stored(tmp_path):
    model, summary = _export(tmp_path, "olmoe", {"*.experts.*": None, "*": "int4-g32-sym"})
    tensors, _ = _read(tmp_path / "m.gguf")
    for bid in range(2):
        experts = model.get_submodule(f"model.layers.{bid}.mlp.experts")
        gate, up = experts.gate_up_proj.chunk(2, dim=1)
        for leaf, w in (("gate", gate), ("up", up), ("down", experts.down_proj)):
            t = tensors[f"blk.{bid}.ffn_{leaf}_exps.weight"]
            assert t.tensor_type == T.F32 and [int(x) for x in t.shape] == [w.shape[2], w.shape[1], w.shape[0]]
            assert np.array_equal(np.asarray(t.data), w.numpy())
    # experts in a 16-bit format are QuantLinears: written as BF16, as stored
    model, summary = _export(tmp_path / "bf16", "mixtral", {"*.experts.*": "bf16", "*": "int4-g32-sym"})
    tensors, _ = _read(tmp_path / "bf16" / "m.gguf")
    _check_experts(model, tensors, {"gate_up_proj": T.BF16, "down_proj": T.BF16})


def _graft(monkeypatch, tmp_path, family, spec, other, expert=3):
    """A checkpoint whose expert ``expert`` of block 0's gate/up is in ``other`` (a plan gives one
    format per 3D weight, so the mix is made by hand at load)."""
    from ampq.exporters import driver

    donor = _model(family)
    ampq.quantize(donor, other, progress=False)
    load = driver.load

    def grafted(directory):
        model = load(directory)
        experts = model.get_submodule("model.layers.0.mlp.experts")
        donors = donor.get_submodule("model.layers.0.mlp.experts")
        experts.gate_up_proj[expert] = donors.gate_up_proj[expert]
        return model

    monkeypatch.setattr(driver, "load", grafted)
    model = _model(family)
    ampq.quantize(model, spec, progress=False)
    ampq.save(model, tmp_path / "ckpt", tiny_tokenizer(VOCAB))
    return donor


def test_experts_of_several_types_are_refused_or_requantized_into_one(tmp_path, monkeypatch):
    donor = _graft(monkeypatch, tmp_path, "qwen3_moe", "int4-g32-sym", "int8-ch-sym")
    with pytest.raises(ampq.AmpqError, match=r"experts of model\.layers\.0\.mlp\.experts\.gate_up_proj are of 2 "
                                             r"types .*int4-g32-sym -> Q4_0 \(experts 0, 1, 2\); int8-ch-sym -> Q8_0 "
                                             r"\(experts 3\).*--nearest") as err:
        ampq.export(tmp_path / "ckpt", tmp_path / "m.gguf", to="gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "m.gguf").exists()

    summary = ampq.export(tmp_path / "ckpt", tmp_path / "m.gguf", to="gguf", nearest=True)
    converted = summary["converted"]
    assert sorted(converted) == [f"model.layers.0.mlp.experts.gate_up_proj.{e}" for e in range(3)]
    assert {c["to"] for c in converted.values()} == {"Q8_0"}  # the wider of the two types
    tensors, _ = _read(tmp_path / "m.gguf")
    for leaf in ("gate", "up"):
        assert tensors[f"blk.0.ffn_{leaf}_exps.weight"].tensor_type == T.Q8_0
        assert tensors[f"blk.1.ffn_{leaf}_exps.weight"].tensor_type == T.Q4_0  # block 1 untouched
    # expert 3 was Q8_0 already: exact; the others moved by what the summary reports
    kept = donor.get_submodule("model.layers.0.mlp.experts").expert_weight("gate_up_proj", 3)
    got = np.concatenate([_dequantized(tensors[f"blk.0.ffn_{leaf}_exps.weight"])[3].reshape(64, 64)
                          for leaf in ("gate", "up")])
    assert torch.equal(torch.from_numpy(got), kept)
    assert 0 < summary["max_abs_change"] < 0.05


@pytest.mark.parametrize("family,match", [
    ("deepseek_v3", "does not write DeepSeek-V3"), ("gpt_oss", "does not write gpt-oss"),
    ("llama4", "does not write Llama-4")])
def test_unsupported_families_are_refused(tmp_path, family, match):
    model = tiny_moe(family)
    ampq.quantize(model, "int4-g32-sym", progress=False)
    ampq.save(model, tmp_path / "ckpt")
    with pytest.raises(ampq.AmpqError, match=match) as err:
        ampq.export(tmp_path / "ckpt", tmp_path / "m.gguf", to="gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family,overrides,match", [
    ("qwen3_moe", {"norm_topk_prob": False}, "does not renormalize the top-k .* qwen3moe always does"),
    ("olmoe", {"norm_topk_prob": True}, "renormalizes the top-k .* olmoe always does not"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "some of its blocks are dense"),
    ("olmoe", {"num_key_value_heads": 2}, "2 key/value heads for 4 query heads"),
])
def test_routing_llama_cpp_does_not_run_is_refused(tmp_path, family, overrides, match):
    with pytest.raises(ampq.AmpqError, match=match) as err:
        _export(tmp_path, family, **overrides)
    assert "\n" not in str(err.value)


# ---- llama.cpp itself ------------------------------------------------------------------------

def _distances(model, path) -> tuple[float, float]:
    """(llama.cpp's relative distance to ampq's logits, what rounding the inputs of every quantized
    linear and expert as llama.cpp does alone moves them): the tolerance of test_gguf_llama_cpp."""
    from _llama_cpp import activation_rounding, llama_cpp_logits

    ids = torch.randint(2, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    layers = list(quantized_linears(model).values())
    for experts in quantized_experts(model).values():
        layers += [m for p in experts.names if experts.quantized(p) is not None for m in experts.quantized(p)]
    with ampq.kernels.use("reference"), torch.no_grad():
        ours = model(ids).logits[0].float()
        hooks = [layer.register_forward_pre_hook(
            lambda _, args, r=activation_rounding(layer.format_name): (r(args[0]),)) for layer in layers]
        try:
            rounded = model(ids).logits[0].float()
        finally:
            for h in hooks:
                h.remove()
    theirs = llama_cpp_logits(path, ids[0].tolist())
    norm = float(ours.norm())
    return float((theirs - ours).norm()) / norm, float((rounded - ours).norm()) / norm


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_runs_the_export(tmp_path, family):
    pytest.importorskip("llama_cpp")
    model, _ = _export(tmp_path, family)
    distance, rounding = _distances(model, tmp_path / "m.gguf")
    assert 0 < rounding < 0.2
    assert distance <= 2 * rounding, (distance, rounding)


def test_llama_cpp_runs_k_quant_experts(tmp_path):
    pytest.importorskip("llama_cpp")
    model, _ = _export(tmp_path, "qwen3_moe", K_SPEC, **WIDE)
    distance, rounding = _distances(model, tmp_path / "m.gguf")
    assert 0 < rounding < 0.2
    assert distance <= 2 * rounding, (distance, rounding)


@pytest.mark.parametrize("wrong", ["gate and up swapped", "experts transposed"])
def test_the_read_back_catches_a_wrong_file(tmp_path, monkeypatch, wrong):
    """Files written wrong fail the checks above: llama.cpp's bound alone does not catch a swapped
    gate/up on these random models (measured 1.5x and 2.0x the rounding for Mixtral and Qwen2-MoE),
    and a square expert transposed loads."""
    from ampq.exporters.gguf import experts as module

    if wrong == "gate and up swapped":
        names = module.Experts.names
        monkeypatch.setattr(module.Experts, "names", lambda self, owner, p: names(self, owner, p)[::-1])
        model, _ = _export(tmp_path, "qwen2_moe")
        with pytest.raises(AssertionError):
            _check_experts(model, _read(tmp_path / "m.gguf")[0], TYPES)
    else:
        plain = module.plain_array
        monkeypatch.setattr(module, "plain_array", lambda t: plain(t.transpose(1, 2).contiguous()))
        model, _ = _export(tmp_path, "qwen2_moe", {"*.experts.*": None, "*": "int4-g32-sym"})
        t = _read(tmp_path / "m.gguf")[0]["blk.0.ffn_down_exps.weight"]
        w = model.get_submodule("model.layers.0.mlp.experts").down_proj
        assert [int(x) for x in t.shape] == [w.shape[2], w.shape[1], w.shape[0]]  # square: the shape passes
        assert not np.array_equal(np.asarray(t.data), w.numpy())


def test_llama_cpp_runs_a_quantized_shared_expert_gate(tmp_path):
    """A router quantized on request (Qwen2-MoE's shared-expert gate, one row) is written in its blocks."""
    pytest.importorskip("llama_cpp")
    model, summary = _export(tmp_path, "qwen2_moe", {"*.shared_expert_gate": "int8-ch-sym", **SPEC})
    assert _read(tmp_path / "m.gguf")[0]["blk.0.ffn_gate_inp_shexp.weight"].tensor_type == T.Q8_0
    distance, rounding = _distances(model, tmp_path / "m.gguf")
    assert distance <= 2 * rounding, (distance, rounding)
