"""AMPQ end to end on a tiny model: sensitivity, allocation under a budget, plan, quantization."""

import json

import pytest
import torch

import ampq
from ampq import AmpqError
from ampq.pipeline import planner
from ampq.pipeline.plans import Plan
from ampq.report import block_linear_names
from ampq.sensitivity import SensitivityTable, measure
from test_model_io import logits, tiny_llama

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
CANDS = ["int3-g64:rtn", "int4-g32:gptq", "int8-ch:rtn", "bf16"]


@pytest.fixture(scope="module")
def table():
    return measure(tiny_llama(), CALIB, CANDS, progress=False)


def test_damage_falls_as_bits_rise(table):
    for layer, d in table.damage.items():
        assert d["int3-g64:rtn"] > d["int4-g32:gptq"] > d["int8-ch:rtn"] > d["bf16"] >= 0, layer


@pytest.mark.parametrize("bpw", [3.7, 4.5, 6.0, 9.0])
def test_budget_is_kept_in_bytes_actually_saved(tmp_path, table, bpw):
    plan = planner.plan_for_budget(table, bits_per_weight=bpw)
    model = ampq.quantize(tiny_llama(), plan, calibration=CALIB, progress=False)
    ampq.save(model, tmp_path / "m", extra_manifest={"plan": plan.to_dict()})
    manifest = json.loads((tmp_path / "m" / "ampq.json").read_text())
    stored = sum(e["bytes"] for e in manifest["layers"].values())
    weights = sum(e["shape"][0] * e["shape"][1] for e in manifest["layers"].values())
    assert stored == plan.total_bytes and 8 * stored / weights <= bpw
    for name, p in plan.layers.items():
        assert manifest["layers"][name]["format"] == p.format
    # q/k/v and gate/up share a format
    for group in plan.tie_groups:
        assert len({plan.layers[n].format for n in group}) == 1
    assert manifest["plan"]["layers"].keys() == plan.layers.keys()
    assert torch.equal(logits(ampq.load(tmp_path / "m")), logits(model))


def test_more_budget_less_damage(table):
    damages = [sum(p.damage for p in planner.plan_for_budget(table, bits_per_weight=b).layers.values())
               for b in (3.7, 4.5, 6, 9, 16)]
    assert damages == sorted(damages, reverse=True) and damages[0] > damages[-1]


def test_impossible_budget_states_the_reachable_range(table):
    with pytest.raises(AmpqError, match=r"span 3\.\d+ to 16\.000 bits per weight"):
        planner.plan_for_budget(table, bits_per_weight=2.0)
    with pytest.raises(AmpqError, match="exactly one budget"):
        planner.plan_for_budget(table)


def test_plan_round_trips_and_hand_written_plans_work(tmp_path, table):
    plan = planner.plan_for_budget(table, bits_per_weight=5.0)
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again.layers == plan.layers and again.budget == plan.budget
    names = block_linear_names(tiny_llama())
    hand = {"ampq_plan": 1, "layers": {n: "int8-ch" if "down" in n else {"format": "int4-g32"} for n in names}}
    (tmp_path / "hand.json").write_text(json.dumps(hand))
    model = ampq.quantize(tiny_llama(), Plan.load(tmp_path / "hand.json"), progress=False)
    assert model.model.layers[1].mlp.down_proj.format_name == "int8-ch"
    assert model.model.layers[1].mlp.up_proj.format_name == "int4-g32"


def test_bad_plans_are_refused(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(AmpqError, match="not valid JSON"):
        Plan.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"ampq_plan": 1, "layers": {"x": "int4-g12x"}}))
    with pytest.raises(AmpqError, match="layer x: unknown format"):
        Plan.load(tmp_path / "b.json")
    with pytest.raises(AmpqError, match="not an ampq plan"):
        Plan.from_dict({"layers": {}})


def test_a_saved_table_is_reused_for_another_budget(tmp_path, monkeypatch, table):
    model = tiny_llama()
    model.config.ampq_source = "tiny"
    path = tmp_path / "sens.json"
    calls = []
    monkeypatch.setattr(planner, "measure", lambda *a, **k: calls.append(1) or table)
    monkeypatch.setattr("ampq.data.make_windows", lambda *a, **k: CALIB)
    planner.sensitivity(model, None, CANDS, table_path=path)
    assert calls == [1] and path.exists()
    reused = planner.sensitivity(model, None, CANDS, table_path=path)
    assert calls == [1] and reused.damage == table.damage
    assert isinstance(SensitivityTable.load(path), SensitivityTable)
