"""Mixture-of-experts models: experts quantized as first-class layers in every family transformers
has (tiny random models from each family's own config class), against the float model with the
same weights decoded (the dequantized reference), through save/load and from_pretrained; each
expert's GPTQ Hessian from the tokens routed to it; routers kept; the coverage line."""

from __future__ import annotations

import copy

import pytest
import torch

import ampq
from ampq import kernels
from ampq.algorithms.gptq import gptq
from ampq.algorithms.rtn import rtn
from ampq.calibrate import LayerStats
from ampq.cli import main
from ampq.experts import experts_modules
from ampq.formats import get_format
from ampq.layer_table import layer_entries
from ampq.models import replace_module
from ampq.nn import QuantLinear, quantized_linears
from ampq.quant_experts import QuantExperts, quantized_experts, quantized_projections
from ampq.report import model_bytes

from moe_models import FAMILIES, tiny_moe

FORMAT = "int4-g32"


def _tokens(n: int = 8, t: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n, t), generator=g)


def _dequantized_reference(original, quantized):
    """``original`` (transformers' own modules) with every weight ``quantized`` stores replaced by
    its decoded value: what the quantized model must compute."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in quantized_linears(quantized).items():
            ref.get_submodule(name).weight.copy_(layer.dequantize())
        for name, (experts, p) in quantized_projections(quantized).items():
            w = torch.stack([experts.expert_weight(p, e) for e in range(experts.num_experts)])
            owner = ref.get_submodule(name.rpartition(".")[0])
            getattr(owner, p).copy_(w.transpose(1, 2) if experts.transposed else w)
    return ref


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float_experts_module_computes_what_transformers_does(family):
    model = tiny_moe(family)
    ids = _tokens(2)
    expected = model(ids).logits
    for name, module in experts_modules(model).items():
        replace_module(model, name, QuantExperts(module))
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uniform_quantization_covers_experts_and_round_trips(family, tmp_path):
    from transformers import AutoModelForCausalLM

    original = tiny_moe(family)
    model = copy.deepcopy(original)
    float_bytes = model_bytes(model)
    ampq.quantize(model, FORMAT, progress=False)
    projections = quantized_projections(model)
    blocks = model.config.num_hidden_layers
    assert len(quantized_experts(model)) == blocks and len(projections) == 2 * blocks
    # bytes drop as predicted: each quantized weight's float32 bytes become its format's bytes
    fmt = get_format(FORMAT)
    predicted = float_bytes
    for layer in quantized_linears(model).values():
        predicted += fmt.nbytes(layer.shape) - 4 * layer.in_features * layer.out_features
    for experts, p in projections.values():
        out, inp = experts.shapes[p]
        predicted += experts.num_experts * (fmt.nbytes((out, inp)) - 4 * out * inp)
    assert model_bytes(model) == predicted

    ids = _tokens(2)
    with kernels.use("reference"):
        got = model(ids).logits
    torch.testing.assert_close(got, _dequantized_reference(original, model)(ids).logits, rtol=1e-4, atol=1e-4)

    ampq.save(model, tmp_path / "q")
    logits = model(ids).logits
    assert torch.equal(ampq.load(tmp_path / "q")(ids).logits, logits)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(hf.get_submodule(next(iter(quantized_experts(model)))), QuantExperts)
    assert torch.equal(hf(ids).logits, logits)


def test_routed_experts_only_run():
    """An expert no token was routed to is never decoded."""
    model = tiny_moe("mixtral")
    ampq.quantize(model, FORMAT, progress=False)
    experts = next(iter(quantized_experts(model).values()))
    called = []
    for p in experts.names:
        for e, layer in enumerate(experts.quantized(p)):
            layer.register_forward_pre_hook(lambda m, a, e=e: called.append(e))
    x = torch.randn(5, 64)
    index = torch.tensor([[0, 2]] * 5)
    experts(x, index, torch.full((5, 2), 0.5))
    assert sorted(set(called)) == [0, 2]


def test_grouped_routing_matches_a_per_token_loop():
    """Each expert runs once on all its tokens; the result is what a loop over every token and each
    of its experts computes from the decoded weights, and a sentinel index (an expert another rank
    holds) adds nothing."""
    model = tiny_moe("qwen3_moe")
    ampq.quantize(model, FORMAT, progress=False)
    experts = next(iter(quantized_experts(model).values()))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 64, generator=g)
    index = torch.randint(0, 5, (9, 2), generator=g)  # 4: the sentinel past the last expert
    weights = torch.rand(9, 2, generator=g)
    expected = torch.zeros_like(x)
    for t in range(9):
        for slot in range(2):
            e = int(index[t, slot])
            if e < 4:
                gate, up = (x[t] @ experts.expert_weight("gate_up_proj", e).t()).chunk(2)
                h = experts.act_fn(gate) * up
                expected[t] += weights[t, slot] * (h @ experts.expert_weight("down_proj", e).t())
    with kernels.use("reference"):
        got = experts(x, index, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gptq_uses_each_experts_routed_tokens():
    """Block 0's expert codes equal GPTQ run on that expert's weight with the Hessian of exactly
    the tokens the router sent it (recorded from transformers' own module)."""
    original = tiny_moe("mixtral")
    ids = _tokens(16)
    seen = {}

    def record(module, args):
        seen.setdefault("x", []).append(args[0])
        seen.setdefault("index", []).append(args[1])

    experts = original.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(record)
    original(ids)
    handle.remove()
    x, index = torch.cat(seen["x"]), torch.cat(seen["index"])

    model = copy.deepcopy(original)
    ampq.quantize(model, {"*.experts.*": FORMAT}, algorithm="gptq", calibration=ids, progress=False)
    quantized = model.model.layers[0].mlp.experts
    fmt = get_format(FORMAT)
    for e in range(4):
        routed = x[(index == e).any(-1)]
        assert routed.shape[0] >= 32
        stats = LayerStats.empty(64, "cpu")
        stats.add(routed)
        codes, params = gptq(experts.gate_up_proj[e].float(), fmt, stats)
        expected = QuantLinear(64, 256, FORMAT, fmt.pack(codes, params))
        assert torch.equal(quantized.quantized("gate_up_proj")[e].dequantize(), expected.dequantize())


def test_experts_without_enough_tokens_fall_back_to_rtn_and_say_so(capsys):
    model = tiny_moe("qwen3_moe")
    ampq.quantize(model, FORMAT, algorithm="gptq", calibration=_tokens(1, 8), progress=True)
    err = capsys.readouterr().err
    assert "16 of 16 expert matrices got fewer than 32 calibration tokens" in err
    experts = model.model.layers[0].mlp.experts
    codes, params = rtn(_float_down(1), get_format(FORMAT))
    assert experts.quantized("down_proj")[1].algorithm == "rtn"
    assert torch.equal(experts.quantized("down_proj")[1].dequantize(),
                       get_format(FORMAT).dequantize_codes(codes, params.values))


def _float_down(e: int) -> torch.Tensor:
    return tiny_moe("qwen3_moe").model.layers[0].mlp.experts.down_proj[e].float()


@pytest.mark.parametrize("family,router", [("llama4", "model.layers.0.feed_forward.router"),
                                           ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate")])
def test_routers_stay_unless_named(family, router):
    model = tiny_moe(family)
    ampq.quantize(model, FORMAT, progress=False)
    assert router not in layer_entries(model)
    model = tiny_moe(family)
    ampq.quantize(model, {"*.router": "int8-ch", "*.shared_expert_gate": "int8-ch", "*": FORMAT}, progress=False)
    assert layer_entries(model)[router]["format"] == "int8-ch"


def test_coverage_line_counts_experts(tmp_path, capsys):
    model = tiny_moe("mixtral")
    total = sum(p.numel() for p in model.parameters())
    attention = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj",
                                                                                      "o_proj")))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    ampq.quantize(model, FORMAT, progress=False)
    line = ampq.coverage(model).line()
    assert line == (f"quantized {100 * (attention + experts) / total:.1f}% of the weights: 8 linears + 2 x 4 experts; "
                    "kept: embeddings, head, router, norms")
    ampq.save(model, tmp_path / "q")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 0
    assert line in capsys.readouterr().out


CANDIDATES = ["int3-g32:gptq", "int4-g32:gptq", "int8-ch:rtn"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_budget_weighs_each_expert_weight(family):
    """AMPQ: every 3D expert weight is one candidate layer of the plan (routers are none), and the
    bytes the plan counted are the bytes the quantized experts store."""
    model = tiny_moe(family)
    ids = _tokens(8)
    names = [f"{n}.{p}" for n, m in experts_modules(model).items() for p in ("gate_up_proj", "down_proj")]
    plan = ampq.plan(model, ampq.Budget(bits=4.5, candidates=CANDIDATES), calibration=ids, progress=False)
    assert set(names) <= set(plan.layers)
    assert not any(n.endswith((".router", ".shared_expert_gate")) for n in plan.layers)
    ampq.quantize(model, plan, calibration=ids, progress=False)
    entries = layer_entries(model)
    assert set(entries) == set(plan.layers)
    for name in names:
        assert entries[name]["format"] == plan.layers[name].format
        assert entries[name]["bytes"] == plan.layers[name].bytes
    weights = sum(e.get("experts", 1) * e["shape"][0] * e["shape"][1] for e in entries.values())
    assert sum(e["bytes"] for e in entries.values()) * 8 <= 4.5 * weights
    assert "experts" not in ampq.coverage(model).kept


def test_size_budget_counts_experts():
    model = tiny_moe("mixtral")
    size = int(0.45 * model_bytes(model))
    ampq.quantize(model, ampq.Budget(bytes=size, candidates=CANDIDATES), calibration=_tokens(8), progress=False)
    assert model_bytes(model) <= size


def test_resumed_run_restores_quantized_experts(tmp_path):
    from ampq.resume import Resume

    ids = _tokens(8)
    reference = ampq.quantize(tiny_moe("gpt_oss"), FORMAT, algorithm="gptq", calibration=ids, progress=False)
    ampq.quantize(tiny_moe("gpt_oss"), FORMAT, algorithm="gptq", calibration=ids, progress=False,
                  resume=Resume(tmp_path / "p", {"test": 1}))
    resumed = Resume(tmp_path / "p", {"test": 1})
    assert resumed.done == 2
    fresh = ampq.quantize(tiny_moe("gpt_oss"), FORMAT, algorithm="gptq", calibration=ids, progress=False,
                          resume=resumed)
    assert len(quantized_projections(fresh)) == 4
    assert torch.equal(fresh(ids[:2]).logits, reference(ids[:2]).logits)
