"""The transform applied before sensitivity: the float model computes what it did, and its weights
quantize with less output error; calibration mixes share their windows among texts."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ampq.data import MIXES, make_windows
from ampq.errors import AmpqError
from ampq.pipeline.blockwise import quantize_blocks as quantize
from ampq.pipeline.transform import apply_transform


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # salient input channels, as trained models have: what AWQ protects
        for block in model.model.layers:
            block.input_layernorm.weight[:4] = 8.0
            block.post_attention_layernorm.weight[:4] = 8.0
    return model


def tokens(n=8, length=32, seed=1):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_awq_transform_keeps_the_float_model_and_helps_its_quantization():
    model = tiny_llama()
    calib, held_out = tokens(), tokens(4, seed=2)
    before = model(held_out).logits
    transformed = copy.deepcopy(model)
    record = apply_transform(transformed, "awq", calib, search_format="int3-g32", progress=False)
    assert record["name"] == "awq" and record["alphas"]
    assert any(alpha > 0 for alpha in record["alphas"].values())
    after = transformed(held_out).logits
    assert torch.allclose(before, after, atol=1e-3 * before.abs().max().item())

    def quantized_error(m):
        m = copy.deepcopy(m)
        quantize(m, "int3-g32", progress=False)
        return float((m(held_out).logits - before).pow(2).mean())

    assert quantized_error(transformed) < quantized_error(model)


def test_no_transform_changes_nothing_and_unknown_names_fail_in_one_line():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_transform(model, "none", tokens(), progress=False) == {"name": "none"}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(AmpqError, match="unknown transform 'rotate'"):
        apply_transform(model, "rotate", tokens(), progress=False)


class WordTokenizer:
    """One token per character: enough to cut windows from real texts."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_a_mix_shares_its_windows_among_its_texts_from_their_calibration_halves():
    tok = WordTokenizer()
    mixed = make_windows(tok, "mix", "calib", 64, 10)
    parts = MIXES["mix"].split("+")
    assert mixed.tokens.shape == (10, 64) and mixed.source == f"{MIXES['mix']}:calib"
    first = [make_windows(tok, t, "calib", 64, 3 if i < 10 % len(parts) else 2) for i, t in enumerate(parts)]
    assert torch.equal(mixed.tokens, torch.cat([w.tokens for w in first]))
    assert torch.equal(make_windows(tok, "wiki+c4", "calib", 64, 4).tokens[2:],
                       make_windows(tok, "c4", "calib", 64, 2).tokens)
    with pytest.raises(AmpqError, match="needs at least 4 windows"):
        make_windows(tok, "mix", "calib", 64, 3)


@torch.no_grad()
def test_a_budget_with_the_awq_transform_plans_and_quantizes_on_the_rescaled_model(tmp_path):
    import ampq
    from ampq.pipeline.plans import Plan

    calib = tokens()
    budget = ampq.Budget(bits=4.25, candidates=("int3-g32:gptq", "int4-g32:gptq", "int8-ch-sym:rtn"),
                         transform="awq", sensitivity=tmp_path / "table.json")
    model = tiny_llama()
    plan = ampq.plan(model, budget, calibration=calib, progress=False)
    assert plan.transform["name"] == "awq" and model.config.ampq_transform["name"] == "awq"
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.transform == plan.transform
    # the plan read back transforms a fresh model the same way before quantizing it
    fresh, same = tiny_llama(), tiny_llama()
    ampq.quantize(fresh, again, calibration=calib, progress=False)
    ampq.quantize(model, plan, calibration=calib, progress=False)  # already transformed: not twice
    held_out = tokens(2, seed=3)
    assert torch.allclose(fresh(held_out).logits, model(held_out).logits, atol=1e-4)
    assert fresh.config.ampq_transform == model.config.ampq_transform
    # a transformed table is another table: the same budget without the transform measures afresh
    plain = ampq.plan(same, ampq.Budget(bits=4.25, candidates=budget.candidates, sensitivity=tmp_path / "table.json"),
                      calibration=calib, progress=False)
    assert plain.transform == {"name": "none"}


def test_unknown_transforms_are_refused_in_budgets_and_plans():
    import ampq
    from ampq.pipeline.plans import Plan

    with pytest.raises(AmpqError, match="unknown transform 'rotate'"):
        ampq.Budget(bits=4, transform="rotate")
    with pytest.raises(AmpqError, match="unknown transform 'rotate'"):
        Plan.from_dict({"ampq_plan": 1, "layers": {"a": "int4-g128"}, "transform": {"name": "rotate"}})


def test_a_plan_for_an_engine_weighs_only_what_that_engine_serves_and_exports_only_to_it(tmp_path):
    import ampq
    from ampq.exporters import export_compressed_tensors, export_gguf
    from ampq.pipeline.targets import TARGETS

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    calib = tokens()
    # llama.cpp's own types start at 4.5 bits (Q4_0: an fp16 scale per 32)
    for target, bits, export, other in (("vllm", 4.25, export_compressed_tensors, export_gguf),
                                        ("llama.cpp", 5.0, export_gguf, export_compressed_tensors)):
        model = LlamaForCausalLM(cfg).eval()
        plan = ampq.plan(model, ampq.Budget(bits=bits, target=target, sensitivity=tmp_path / f"{target}.json"),
                         calibration=calib, progress=False)
        assert plan.target == target
        assert {f"{p.format}:{p.algorithm}" if p.format != "bf16" else "bf16" for p in plan.layers.values()} \
            <= set(TARGETS[target][1])
        out = tmp_path / target
        ampq.quantize(model, plan, calibration=calib, output=out, progress=False)
        summary = export(out, tmp_path / (f"{target}.export" + (".gguf" if export is export_gguf else "")))
        assert not summary.get("converted"), summary  # exact: no layer re-quantized
        with pytest.raises(AmpqError, match=f"made for {target}"):
            other(out, tmp_path / (f"{target}.other" + (".gguf" if other is export_gguf else "")))
    with pytest.raises(AmpqError, match="nf4-b64-dq:gptq cannot be served by vllm"):
        ampq.plan(LlamaForCausalLM(cfg).eval(), ampq.Budget(bits=4.25, target="vllm", candidates=("nf4-b64-dq:gptq",)),
                  calibration=calib, progress=False)
    with pytest.raises(AmpqError, match="unknown serving target 'tgi'"):
        ampq.Budget(bits=4, target="tgi")


@torch.no_grad()
def test_transform_auto_keeps_the_plan_of_least_estimated_damage(tmp_path, monkeypatch):
    import ampq

    monkeypatch.setenv("AMPQ_CACHE", str(tmp_path))  # the sensitivity tables go to a cache of this test's own
    model = tiny_llama()
    held_out = tokens(4, seed=2)
    before = model(held_out).logits
    budget = ampq.Budget(bits=4.5, candidates=("int3-g32:gptq", "int4-g32:gptq", "bf16"), transform="auto",
                         estimator="hessian")
    plan = ampq.plan(model, budget, calibration=tokens(), progress=False)
    compared = plan.transform["compared"]
    assert set(compared) == {"none", "awq"}
    kept = plan.transform["name"]
    assert compared[kept] == min(compared.values())
    assert sum(p.damage for p in plan.layers.values()) == pytest.approx(compared[kept])
    # the salient channels make AWQ's rescaling worth more than the allocation: it wins here, and
    # the model now holds the transformed blocks, computing what it did
    assert kept == "awq" and getattr(model.config, "ampq_transform")["name"] == "awq"
    assert torch.allclose(model(held_out).logits, before, atol=1e-3 * before.abs().max().item())
    with pytest.raises(AmpqError, match="already transformed"):
        ampq.plan(model, budget, calibration=tokens(), progress=False)
