"""Runtime adaptation of mixture-of-experts models: every expert's matrix nested (base + residuals),
each expert projection switching level as one unit, through save/load, from_pretrained and a
resumed run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import ampq
from ampq import AmpqError
from ampq.layer_table import check_entry, layer_entries
from ampq.nested import NestedLinear
from ampq.nested_experts import NestedProjection
from ampq.pipeline.adaptive import adapt, level_table, nested_layers, stored_range
from ampq.quant_experts import quantized_projections
from moe_models import FAMILIES, tiny_moe

BASE = "int4-g32"
CALIB = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(1))
IDS = CALIB[:2]


def _adaptive(family: str):
    return ampq.quantize(tiny_moe(family), BASE, adaptive="4:8", calibration=CALIB, progress=False)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_nest_and_switch_as_one_unit(family):
    model = _adaptive(family)
    units = nested_layers(model)
    projections = quantized_projections(model)
    assert projections and set(projections) <= set(units)
    for name in projections:
        unit = units[name]
        assert isinstance(unit, NestedProjection) and unit.levels == 2 and unit.level == 1
        assert all(isinstance(m, NestedLinear) for m in unit.layers)
        assert unit.numel == len(unit.layers) * unit.shape[0] * unit.shape[1]
    damage, nbytes = level_table(model)
    for name in projections:  # a residual costs bytes and removes estimated damage
        assert nbytes[name]["L1"] > nbytes[name]["L0"] and damage[name]["L1"] < damage[name]["L0"]

    reference = _logits(tiny_moe(family))
    top = _logits(model)
    lo, hi = stored_range(model)
    switch = adapt(model, lo)
    assert switch.changed == len(units) and switch.bytes_after < switch.bytes_before
    assert all(m.level == 0 for m in nested_layers(model).values())
    # the lowest level is exactly the model quantized to the base format directly
    direct = ampq.quantize(tiny_moe(family), BASE, algorithm="gptq", calibration=CALIB, progress=False)
    assert torch.equal(_logits(model), _logits(direct))
    assert (top - reference).abs().mean() < 0.5 * (_logits(direct) - reference).abs().mean()
    adapt(model, hi)
    assert torch.equal(_logits(model), top)


def test_a_budget_between_moves_experts_and_linears_alike():
    model = _adaptive("qwen3_moe")
    lo, hi = stored_range(model)
    switch = adapt(model, (lo + hi) / 2)
    assert 0 < switch.changed < len(switch.levels)
    weights = sum(m.numel for m in nested_layers(model).values())
    assert 8 * switch.bytes_after <= (lo + hi) / 2 * weights


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_checkpoint_round_trip_and_levels_read_back(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _adaptive(family)
    top = _logits(model)
    ampq.save(model, tmp_path / "q")
    entry = next(e for e in layer_entries(model).values() if e.get("kind") == "experts")
    assert len(entry["nested"]["expert_damage"]) == entry["experts"] and entry["nested"]["residuals"]
    back = ampq.load(tmp_path / "q")
    assert torch.equal(_logits(back), top)
    lo, hi = stored_range(back)
    adapt(back, lo)
    adapt(model, lo)
    assert torch.equal(_logits(back), _logits(model))
    adapt(back, hi)  # the experts' residuals come back from the checkpoint, hash-checked
    assert torch.equal(_logits(back), top)
    assert level_table(back) == level_table(model)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(hf), top)


def test_an_expert_residual_rewritten_on_disk_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    ampq.save(_adaptive("mixtral"), tmp_path / "q")
    model = ampq.load(tmp_path / "q")
    adapt(model, stored_range(model)[0])
    manifest = json.loads((tmp_path / "q" / "ampq.json").read_text())
    name = next(n for n in manifest["tensors"] if ".experts.down_proj.1.residuals.0.codes" in n)
    path = tmp_path / "q" / manifest["tensors"][name]["file"]
    tensors = load_file(path)
    tensors[name] = tensors[name] ^ 1
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(AmpqError, match="damaged"):
        adapt(model, stored_range(model)[1])


def test_resumed_adaptive_run_restores_nested_experts(tmp_path):
    from ampq.resume import Resume

    reference = _adaptive("gpt_oss")
    ampq.quantize(tiny_moe("gpt_oss"), BASE, adaptive="4:8", calibration=CALIB, progress=False,
                  resume=Resume(tmp_path / "p", {"test": 1}))
    resumed = Resume(tmp_path / "p", {"test": 1})
    assert resumed.done == 2
    fresh = ampq.quantize(tiny_moe("gpt_oss"), BASE, adaptive="4:8", calibration=CALIB, progress=False, resume=resumed)
    assert level_table(fresh) == level_table(reference)
    assert torch.equal(_logits(fresh), _logits(reference))
    lo = stored_range(fresh)[0]
    adapt(fresh, lo)  # the residuals held aside were restored too: switching works both ways
    adapt(reference, lo)
    assert torch.equal(_logits(fresh), _logits(reference))


def test_malformed_expert_damage_is_refused():
    model = _adaptive("mixtral")
    entry = copy.deepcopy(next(e for e in layer_entries(model).values() if e.get("kind") == "experts"))
    check_entry(entry)
    entry["nested"]["expert_damage"] = entry["nested"]["expert_damage"][:-1]
    with pytest.raises(ValueError, match="expert damage"):
        check_entry(entry)



def test_residuals_of_experts_without_enough_tokens_are_said(capsys):
    ampq.quantize(tiny_moe("qwen3_moe"), BASE, adaptive="4:8", calibration=CALIB[:1, :8], progress=True)
    err = capsys.readouterr().err
    assert "the residuals of 16 expert matrices were rounded to nearest" in err
