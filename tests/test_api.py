"""The library does what the CLI does: ampq.quantize takes a format, a map, a Scheme, a Plan or a
Budget; ampq.plan makes a plan from a budget; ampq.evaluate and ampq.export are public; bad input
is refused in one line."""

import dataclasses
import json

import pytest
import torch

import ampq
from ampq import AmpqError, Budget, Plan
from ampq.data import Windows
from ampq.pipeline import planner
from ampq.pipeline.planner import matching_uniform
from ampq.sensitivity import SensitivityTable
from test_model_io import logits, tiny_llama

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
CANDS = ("int3-g64:rtn", "int4-g32:gptq", "int8-ch:rtn", "bf16")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def budget(bits=4.5, **kw):
    return Budget(bits=bits, candidates=CANDS, **kw)


def stored_bits(model) -> float:
    layers = ampq.nn.quantized_linears(model)
    return 8 * sum(m.nbytes() for m in layers.values()) / sum(m.in_features * m.out_features for m in layers.values())


def test_budget_to_plan_to_quantize(cache):
    plan = ampq.plan(tiny_llama(), budget(), calibration=CALIB, progress=False)
    assert isinstance(plan, Plan) and plan.budget == {"bits_per_weight": 4.5}
    assert {p.format for p in plan.layers.values()} <= {"int3-g64", "int4-g32", "int8-ch", "bf16"}
    assert len(list((cache / "sensitivity").glob("*.json"))) == 1  # measured once, cached
    model = ampq.quantize(tiny_llama(), plan, calibration=CALIB, progress=False)
    assert stored_bits(model) <= 4.5
    for name, p in plan.layers.items():
        assert model.get_submodule(name).format_name == p.format
    # a Budget given to quantize makes the same plan (from the cached table) and the same model
    direct = ampq.quantize(tiny_llama(), budget(), calibration=CALIB, progress=False)
    assert torch.equal(logits(direct), logits(model))
    assert direct.ampq_manifest["plan"] == plan.to_dict()
    assert direct.ampq_manifest["sensitivity"]["candidates"] == list(CANDS)


def test_budget_in_bytes_counts_the_whole_model(cache):
    model = tiny_llama()
    size = ampq.report.model_bytes(model) * 0.25
    quantized = ampq.quantize(model, Budget(bytes=int(size), candidates=CANDS), calibration=CALIB, progress=False)
    assert ampq.report.model_bytes(quantized) <= size
    assert Budget(bytes="90MB").bytes == 90_000_000 and Budget(bytes="90MB").label == "ampq-90MB"


def test_a_scheme_is_the_format_and_method_it_names():
    gptq = dataclasses.replace(ampq.get_scheme("gptq"), format="int4-g32")
    by_scheme = ampq.quantize(tiny_llama(), gptq, calibration=CALIB, progress=False)
    by_keywords = ampq.quantize(tiny_llama(), "int4-g32", algorithm="gptq", calibration=CALIB, progress=False)
    rtn = ampq.quantize(tiny_llama(), "int4-g32", progress=False)
    assert torch.equal(logits(by_scheme), logits(by_keywords)) and not torch.equal(logits(by_scheme), logits(rtn))
    assert by_scheme.model.layers[0].mlp.up_proj.algorithm == "gptq"


def test_calibration_may_be_a_text_with_a_tokenizer(monkeypatch):
    seen = []

    def cut(tokenizer, source, split, window, n, stride=None):
        seen.append((tokenizer, source, split, window, n))
        return Windows(CALIB[:n, :window], [0] * n, window, window, source)

    monkeypatch.setattr("ampq.data.make_windows", cut)
    a = ampq.quantize(tiny_llama(), "int4-g32", algorithm="gptq", calibration=ampq.Text("c4", windows=3, window=16),
                      tokenizer="tok", progress=False)
    b = ampq.quantize(tiny_llama(), "int4-g32", algorithm="gptq", calibration=CALIB[:3, :16], progress=False)
    assert seen == [("tok", "c4", "calib", 16, 3)] and torch.equal(logits(a), logits(b))
    ampq.quantize(tiny_llama(), "int4-g32", calibration="wiki", progress=False)  # round to nearest reads no text
    assert len(seen) == 1


def test_output_saves_with_the_plan_and_refuses_to_overwrite(tmp_path, cache):
    out = tmp_path / "ckpt"
    model = ampq.quantize(tiny_llama(), budget(5.0), calibration=CALIB, output=out, progress=False)
    manifest = json.loads((out / "ampq.json").read_text())
    assert manifest["plan"]["budget"] == {"bits_per_weight": 5.0} and manifest["sensitivity"]["estimator"] == "fisher"
    assert torch.equal(logits(ampq.load(out)), logits(model))
    assert not any(p.name.endswith(".ampq-resume") for p in tmp_path.iterdir())  # progress removed after the save
    with pytest.raises(AmpqError, match="already exists.*--overwrite"):
        ampq.quantize(tiny_llama(), "int8-ch", output=out, progress=False)
    ampq.quantize(tiny_llama(), "int8-ch", output=out, overwrite=True, progress=False)
    assert "plan" not in json.loads((out / "ampq.json").read_text())


def test_the_cpu_is_a_device():
    model = ampq.quantize(tiny_llama(), "int8-ch", device="cpu", progress=False)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("call,message", [
    (lambda: ampq.quantize(tiny_llama(), "gptq", progress=False), "'gptq' is a scheme, not a format"),
    (lambda: ampq.quantize(tiny_llama(), "int4-g12x", progress=False), "unknown format 'int4-g12x'"),
    (lambda: ampq.quantize(tiny_llama(), 4.25, progress=False), "not float"),
    (lambda: ampq.quantize(tiny_llama(), budget(), progress=False), "needs calibration text"),
    (lambda: ampq.quantize(tiny_llama(), ampq.get_scheme("gptq"), algorithm="rtn", progress=False), "uses gptq, not rtn"),
    (lambda: ampq.quantize(tiny_llama(), budget(), adaptive="4:8", calibration=CALIB, progress=False), "drop --budget"),
    (lambda: ampq.quantize(tiny_llama(), "int8-ch", adaptive="4:8", calibration=CALIB, progress=False), "not a 4-bit base"),
    (lambda: ampq.quantize(tiny_llama(), "int4-g32", device="tpu", progress=False), "unknown device 'tpu'"),
    (lambda: ampq.quantize(ampq.quantize(tiny_llama(), "int8-ch", progress=False), "int4-g32"), "already quantized"),
    (lambda: ampq.quantize(tiny_llama(), "int4-g32", calibration=3.5, algorithm="gptq"), "not float"),
    (lambda: dataclasses.replace(ampq.get_scheme("gptq"), format="int4-g12x"), "unknown format 'int4-g12x'"),
    (lambda: Budget(), "exactly one budget"),
    (lambda: Budget(bits=4, bytes=10), "exactly one budget"),
    (lambda: Budget(bits=-1), "not between 0 and 32"),
    (lambda: Budget(bytes="ninety"), "cannot read size"),
    (lambda: Budget(bits=4, estimator="guess"), "unknown sensitivity estimator"),
    (lambda: ampq.export("x", "y", to="onnx"), "unknown export target 'onnx'"),
    (lambda: ampq.evaluate({}), "at least one model"),
])
def test_bad_input_is_refused_in_one_line(call, message):
    with pytest.raises(AmpqError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_a_missing_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AmpqError, match="sees no GPU") as e:
        ampq.quantize(tiny_llama(), "int4-g32", device="cuda", progress=False)
    assert "\n" not in str(e.value)
    model = ampq.quantize(tiny_llama(), "int4-g32", device="auto", progress=False)  # auto: the CPU then
    assert next(model.parameters()).device.type == "cpu"


def test_evaluate_scores_models_against_the_original():
    original = tiny_llama()
    q8 = ampq.quantize(tiny_llama(), "int8-ch", progress=False)
    q3 = ampq.quantize(tiny_llama(), "int3-g32", progress=False)
    [result] = ampq.evaluate({"int8": q8, "int3": q3}, original, text=CALIB, progress=False)
    assert result.reference.kl == 0 and result.reference.top1 == 1
    assert 0 < result.models["int8"].kl < result.models["int3"].kl
    assert result.models["int8"].tokens == CALIB.numel() - len(CALIB)
    [alone] = ampq.evaluate(q8, text=CALIB, progress=False)  # no original: perplexity only
    assert alone.reference is None and alone.models["model"].kl is None
    assert alone.models["model"].perplexity == pytest.approx(result.models["int8"].perplexity)


def test_export_dispatches_to_the_writer_of_the_target(monkeypatch):
    calls = []
    monkeypatch.setitem(ampq.exporting.TARGETS, "gguf", lambda *a, **k: calls.append((a, k)) or {"line": "ok"})
    assert ampq.export("ckpt", "out.gguf", to="gguf", nearest=True) == {"line": "ok"}
    assert calls == [(("ckpt", "out.gguf", True), {"overwrite": False})]


def test_the_public_names_are_the_functions_not_the_modules():
    import ampq.evaluation  # noqa: F401 - the modules of the same name, imported again
    import ampq.exporters.gguf  # noqa: F401

    for name in ("quantize", "plan", "adapt", "evaluate", "export"):
        assert callable(getattr(ampq, name)) and not isinstance(getattr(ampq, name), type(ampq)), name


def test_the_uniform_match_is_the_candidate_nearest_the_budget():
    shapes = {"a": [64, 128], "b": [64, 128]}
    nbytes = {n: {"int3-g64:rtn": 3400, "int4-g128:gptq": 4270, "int4-g64:gptq": 4500, "bf16": 16384} for n in shapes}
    table = SensitivityTable("fisher", list(nbytes["a"]), {n: dict.fromkeys(nbytes["a"], 1.0) for n in shapes},
                             nbytes, shapes)
    assert matching_uniform(table, Budget(bits=4.25)).format == "int4-g128"  # 4.17 bits, int4-g64 4.39
    assert matching_uniform(table, Budget(bits=3.3)).format == "int3-g64"  # 3.32 bits
    assert matching_uniform(table, Budget(bits=15)).format == "int4-g64"  # 16-bit candidates are no uniform scheme
    uniform = matching_uniform(table, Budget(bytes=1000 + 2 * 4500), fixed=1000)
    assert (uniform.format, uniform.algorithm) == ("int4-g64", "gptq")


def test_plan_refuses_a_budget_out_of_reach(cache):
    with pytest.raises(AmpqError, match=r"a budget of 1\.0 bits per weight cannot be met: these candidates span"):
        ampq.plan(tiny_llama(), budget(1.0), calibration=CALIB, progress=False)
    assert isinstance(planner.plan_with_table(tiny_llama(), 6.0, CALIB, None, progress=False)[1], SensitivityTable)
