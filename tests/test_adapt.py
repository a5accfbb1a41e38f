"""Runtime adaptation on a tiny model: nested storage, switching, policies, checkpoint round trips."""

import json
import shutil

import pytest
import torch

import ampq
from ampq import AmpqError
from ampq.pipeline.adaptive import (MemoryTarget, QualityTarget, adapt, nested_layers, plan_levels, quantize_adaptive,
                        stored_range)
from ampq.nested import parse_levels, residual_formats
from ampq.report import linear_bits, model_bytes
from test_model_io import logits, tiny_llama

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
BASE = "int4-g32"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = quantize_adaptive(tiny_llama(), [4, 8], CALIB, base_format=BASE, progress=False)
    path = tmp_path_factory.mktemp("adaptive") / "m"
    ampq.save(model, path)
    return path, logits(model)


def test_levels_and_residual_formats():
    assert parse_levels("4:8") == [4, 8] and parse_levels("3:5:8") == [3, 5, 8]
    assert residual_formats([3, 5, 8], "int3-g64") == ["int2-g64-sym", "int3-g64-sym"]
    assert residual_formats([4, 8], "nf4-b64") == ["int4-g64-sym"]
    assert residual_formats([4, 8], "int4-ch") == ["int4-g128-sym"]
    for bad in ("8:4", "4", "4:5", "x:8", "1:8"):
        with pytest.raises(AmpqError):
            residual_formats(parse_levels(bad), "int4-g128")


def test_lowest_level_is_the_direct_quantization_and_top_is_closer(saved):
    path, top = saved
    reference = logits(tiny_llama())
    direct = ampq.quantize(tiny_llama(), BASE, algorithm="gptq", calibration=CALIB, progress=False)
    model = ampq.load(path)
    adapt(model, stored_range(model)[0])
    assert all(m.level == 0 for m in nested_layers(model).values())
    assert torch.equal(logits(model), logits(direct))
    # the residual halves (at least) the distance to the unquantized model
    assert (top - reference).abs().mean() < 0.5 * (logits(direct) - reference).abs().mean()


def test_switching_down_and_up_matches_a_fresh_load(saved, tmp_path):
    path, top = saved
    model = ampq.load(path)
    lo, hi = stored_range(model)
    middle = adapt(model, (lo + hi) / 2)
    assert 0 < middle.changed < len(nested_layers(model)) and middle.bytes_after < middle.bytes_before
    assert linear_bits(model) <= (lo + hi) / 2
    mid_logits = logits(model)
    ampq.save(model, tmp_path / "mid")  # a checkpoint of just that plan
    assert torch.equal(logits(ampq.load(tmp_path / "mid")), mid_logits)
    fresh = ampq.load(path)
    adapt(fresh, levels=middle.levels)
    assert torch.equal(logits(fresh), mid_logits)
    adapt(model, lo)
    up = adapt(model, hi)
    assert up.changed == len(nested_layers(model)) and torch.equal(logits(model), top)


def test_more_bytes_less_estimated_damage(saved):
    model = ampq.load(saved[0])
    for name, layer in nested_layers(model).items():
        assert layer.damage[0] > layer.damage[1] > 0, name
    lo, hi = stored_range(model)
    damages = [plan_levels(model, budget=b)[1] for b in torch.linspace(lo, hi, 5).tolist()]
    assert damages == sorted(damages, reverse=True) and damages[0] > damages[-1]


def test_going_down_reads_nothing_and_going_up_checks_hashes(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved[0], copy)
    model = ampq.load(copy)
    lo, hi = stored_range(model)
    shutil.rmtree(copy)
    adapt(model, lo)  # needs nothing from disk
    with pytest.raises(AmpqError, match="cannot read residual 1 .* moved or damaged"):
        adapt(model, hi)
    # a residual rewritten on disk after loading is refused, not used
    shutil.copytree(saved[0], copy)
    model = ampq.load(copy)
    adapt(model, lo)
    manifest = json.loads((copy / "ampq.json").read_text())
    name = next(n for n in manifest["tensors"] if ".residuals.0.codes" in n)
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    tensors[name] = tensors[name] ^ 1
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AmpqError, match="damaged"):
        adapt(model, hi)


def test_budget_outside_what_is_stored_is_a_clear_error(saved):
    model = ampq.load(saved[0])
    with pytest.raises(AmpqError, match=r"outside what this model stores: 5\.000 to 9\.500 bits per weight"):
        adapt(model, 3.0)
    with pytest.raises(AmpqError, match="MB to"):
        adapt(model, max_size="1KB")
    with pytest.raises(AmpqError, match="exactly one budget"):
        adapt(model)
    with pytest.raises(AmpqError, match="no adaptive layers"):
        adapt(tiny_llama(), 4.0)


def test_generation_continues_across_a_switch(saved):
    model = ampq.load(saved[0])
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode():
        first = model(ids, use_cache=True)
        adapt(model, stored_range(model)[0])
        token = first.logits[:, -1:].argmax(-1)
        cache = {"cache": first.cache} if getattr(first, "cache", None) is not None else {
            "past_key_values": first.past_key_values}
        step = model(token, use_cache=True, **cache)
        # the step after the switch sees the cache from before it and the new weights
        whole = model(torch.cat([ids, token], 1))
    assert step.logits.shape == (1, 1, whole.logits.shape[-1])
    assert torch.isfinite(step.logits).all()


def test_memory_policy_keeps_the_model_under_target(saved):
    model = ampq.load(saved[0])
    full = model_bytes(model)
    smallest = full - sum(m.nbytes() - m.level_bytes(0) for m in nested_layers(model).values())
    free = [10**12]
    policy = MemoryTarget(max_bytes=(full + smallest) // 2, reserve=0, hysteresis=0, free_memory=lambda: free[0])
    switch = policy(model)
    assert switch is not None and model_bytes(model) <= (full + smallest) // 2
    assert policy(model) is None  # already there: nothing to do
    free[0] = 0  # nothing left to grow into, but nothing to give back either
    assert policy(model) is None
    policy.reserve = full  # memory ran short of the reserve: down to the smallest stored plan
    policy(model)
    assert model_bytes(model) == smallest
    free[0], policy.reserve = 10**12, 0
    policy.max_bytes = full
    policy(model)
    assert model_bytes(model) == full


def test_quality_policy_picks_the_smallest_plan_meeting_the_bar(saved):
    model = ampq.load(saved[0])
    lo, hi = stored_range(model)
    loose = plan_levels(model, budget=lo)[1] * 2
    QualityTarget(loose)(model)
    assert linear_bits(model) == pytest.approx(lo)
    bar = plan_levels(model, budget=(lo + hi) / 2)[1]
    QualityTarget(bar)(model)
    assert plan_levels(model, budget=linear_bits(model))[1] <= bar
    assert linear_bits(model) <= (lo + hi) / 2 + 1e-6
