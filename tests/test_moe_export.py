"""Mixture-of-experts experts exported to compressed-tensors as vLLM reads MoE checkpoints: one layer
per expert under the hub's names (what transformers' own save_pretrained writes), decompressed by
compressed-tensors' own API to ampq's decoded experts bit for bit, loaded by transformers'
from_pretrained with ampq's logits, and read back by ampq's importer into QuantExperts; the
refusals where vLLM could not run what would be written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("compressed_tensors")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

import ampq  # noqa: E402
from ampq.expert_names import FAMILIES as NAMED  # noqa: E402
from ampq.quant_experts import QuantExperts, quantized_experts  # noqa: E402

from moe_models import tiny_moe  # noqa: E402

torch.set_num_threads(1)
FAMILIES = sorted(NAMED)
MIXED = {"*.experts.*": "int8-ch-sym", "*": "int4-g32-sym"}  # two config groups: experts by their pattern


def _ids():
    return torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _exported(tmp_path, family, spec, nearest=False):
    model = tiny_moe(family)
    ampq.quantize(model, spec, progress=False)
    ampq.save(model, tmp_path / "q")
    summary = ampq.export(tmp_path / "q", tmp_path / "ct", to="compressed-tensors", nearest=nearest)
    return ampq.load(tmp_path / "q"), summary


def _keys(folder) -> set[str]:
    keys = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    return keys


def _decompressed(out) -> dict[str, torch.Tensor]:
    """Every quantized linear of the export as compressed-tensors alone decompresses it: a plain
    module tree of nn.Linear under the stored names, the config applied by the library (its own
    target and ignore matching), compressed to its layout, loaded, then decompressed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    qconfig = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    tensors = load_file(out / "model.safetensors")
    shapes = {k.rpartition(".")[0]: tuple(v.tolist()) for k, v in tensors.items() if k.endswith(".weight_shape")}
    shapes.update({k.rpartition(".")[0]: tuple(v.shape) for k, v in tensors.items()
                   if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn})
    root = nn.Module()
    for name, (rows, cols) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, nn.Linear(cols, rows, bias=False))
    apply_quantization_config(root, qconfig)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(root)
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] in shapes and not k.endswith(".bias")}
    missing, unexpected = root.load_state_dict(state, strict=False, assign=True)
    assert not missing and not unexpected
    compressor.decompress_model(root)
    return {name: root.get_submodule(name).weight.detach().float() for name in shapes}


@pytest.mark.parametrize("family", FAMILIES)
def test_names_are_the_ones_transformers_writes(tmp_path, family):
    """Every tensor the export writes sits where transformers' save_pretrained puts the model's own
    (a quantized linear's weight becomes weight_packed / weight_scale / weight_shape)."""
    _exported(tmp_path, family, "int4-g32-sym")
    tiny_moe(family).save_pretrained(tmp_path / "hf")
    ours, theirs = _keys(tmp_path / "ct"), _keys(tmp_path / "hf")
    quantized = {k.rpartition(".")[0] for k in ours if k.endswith(".weight_packed")}
    assert any(".experts.3." in q for q in quantized)
    as_weights = {f"{k.rpartition('.')[0]}.weight" if k.rpartition(".")[0] in quantized and ".weight_" in k else k
                  for k in ours}
    assert as_weights == theirs


@pytest.mark.parametrize("family,spec", [(f, "int4-g32-sym") for f in FAMILIES]
                         + [("mixtral", MIXED), ("qwen3_moe", MIXED), ("olmoe", "fp8-e4m3-ch")])
def test_compressed_tensors_decompresses_each_expert_to_ampqs_weights(tmp_path, family, spec):
    model, summary = _exported(tmp_path, family, spec)
    assert summary["layers"] == summary["exact"] and not summary["converted"]
    weights = _decompressed(tmp_path / "ct")
    naming = NAMED[family]
    checked = 0
    for name, experts in quantized_experts(model).items():
        hub = name.replace(".mlp.", f".{naming.block}.") if naming.block else name
        for e in range(experts.num_experts):
            gate_up, down = experts.expert_weight("gate_up_proj", e), experts.expert_weight("down_proj", e)
            gate, up = gate_up.chunk(2)
            for leaf, expected in zip(naming.leaves, (gate, up, down)):
                assert torch.equal(weights[f"{hub}.{e}.{leaf}"], expected)
                checked += 1
    assert checked == 3 * 4 * 2


@pytest.mark.parametrize("family,spec", [(f, "int4-g32-sym") for f in FAMILIES] + [("mixtral", MIXED)])
def test_transformers_and_ampq_load_the_export_with_ampqs_logits(tmp_path, family, spec):
    from transformers import AutoModelForCausalLM

    model, _ = _exported(tmp_path, family, spec)
    ids = _ids()
    with ampq.kernels.use("reference"):
        expected = model(ids).logits
        back = ampq.load(tmp_path / "ct")  # ampq's compressed-tensors importer
        assert torch.equal(back(ids).logits, expected)
    for name, experts in quantized_experts(model).items():
        read = back.get_submodule(name)
        assert isinstance(read, QuantExperts)
        for p in experts.names:
            for e in range(experts.num_experts):
                assert torch.equal(read.expert_weight(p, e), experts.expert_weight(p, e))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert (hf(ids).logits - expected).abs().max() <= 1e-5


def test_experts_kept_in_16_bits_are_written_one_by_one_and_ignored(tmp_path):
    model, summary = _exported(tmp_path, "mixtral", {"*.experts.*": "bf16", "*": "int4-g32-sym"})
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    pattern = r"re:model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.(w1|w3|w2|gate_proj|up_proj|down_proj)$"
    assert qc["ignore"] == [pattern, "lm_head"]
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in _keys(tmp_path / "ct")
    back = ampq.load(tmp_path / "ct")  # in bf16, the dtype most of its numbers are stored in
    for name, experts in quantized_experts(model).items():  # bf16 experts: QuantLinears of a 16-bit format
        for p in experts.names:
            stacked = torch.stack([experts.expert_weight(p, e, torch.bfloat16) for e in range(4)])
            assert torch.equal(getattr(back.get_submodule(name), p), stacked)
    # transformers 5.25 itself does not load a compressed-tensors MoE checkpoint whose experts are
    # unquantized (its expert merge finds no tensors, whatever the ignore list says), so no
    # from_pretrained check here


def test_nearest_requantizes_experts_into_one_scheme(tmp_path):
    model, summary = _exported(tmp_path, "qwen3_moe", "int4-g32", nearest=True)  # fp16 minimums: not exact
    assert summary["converted"] and any(".experts.down_proj." in n for n in summary["converted"])
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["symmetric"] for g in qc["config_groups"].values()] == [False]


def test_refusals(tmp_path):
    def refused(family, spec, match):
        model = tiny_moe(family)
        ampq.quantize(model, spec, progress=False)
        ampq.save(model, tmp_path / family)
        with pytest.raises(ampq.AmpqError, match=match) as err:
            ampq.export(tmp_path / family, tmp_path / f"{family}-ct", to="compressed-tensors")
        assert "\n" not in str(err.value) and not (tmp_path / f"{family}-ct").exists()

    refused("gpt_oss", "int4-g32-sym", "gpt-oss checkpoints keep their experts fused")
    refused("llama4", "int4-g32-sym", "Llama-4 checkpoints keep their experts fused")
    refused("qwen3_moe", {"*.experts.down_proj": "int8-ch-sym", "*": "int4-g32-sym"},
            "one scheme, but gate_up_proj of expert 0 is int4-g32-sym .*down_proj of expert 0 is int8-ch-sym")
    refused("olmoe", {"*.experts.down_proj": "bf16", "*": "int4-g32-sym"}, r"down_proj of expert 0 is bf16 \(unquantized\)")
    refused("mixtral", {"*.experts.down_proj": None, "*": "int4-g32-sym"}, "down_proj is kept in 16 bits")
    refused("qwen2_moe", {"*.shared_expert_gate": "int8-ch-sym", "*": "int4-g32-sym"},
            "shared_expert_gate is a router quantized as int8-ch-sym; vLLM runs MoE routers unquantized")
    # GGUF's own refusal: transformers' default Qwen3-MoE routing is not the one llama.cpp's qwen3moe runs
    with pytest.raises(ampq.AmpqError, match="cannot export .* to GGUF: its router does not renormalize"):
        ampq.export(tmp_path / "qwen3_moe", tmp_path / "x.gguf", to="gguf")
