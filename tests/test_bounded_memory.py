"""Quantization under a memory cap: weights read a block at a time from the safetensors files,
calibration activations spilled to disk, the output streamed; the result is the same bytes as a
run without a cap, and a real model larger than the cap stays under it (measured)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ampq
from ampq.data import make_windows
from ampq.errors import AmpqError
from ampq.io import safetensors_file
from ampq.io.lazy import weights_of
from ampq.memory import MemoryCap, run_measured
from ampq.loading import load_model
from ampq.spill import ActivationStore
from test_resume import model_dir  # noqa: F401 - the 12-block random Llama, as a fixture

GB = 10**9


def test_streamed_safetensors_read_back_by_safetensors(tmp_path):
    torch.manual_seed(0)
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i8": torch.randint(-128, 127, (9,), dtype=torch.int8), "u8": torch.randint(0, 255, (4, 3), dtype=torch.uint8),
               "bool": torch.rand(5) > 0.5, "e4m3": torch.randn(6).to(torch.float8_e4m3fn), "empty": torch.zeros(0, 4),
               "i64": torch.arange(3)}
    path = tmp_path / "a.safetensors"
    hashes = safetensors_file.write(path, tensors, {"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt"}
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))
            assert hashes[k] == hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    stored, meta = safetensors_file.read_header(path)
    assert meta == {"format": "pt"}
    for k, t in tensors.items():
        assert torch.equal(stored[k].read().view(torch.uint8), t.view(torch.uint8))
    # a stored tensor streams into another file, converted chunk by chunk, as torch converts it whole
    from ampq.io.lazy import Converted

    safetensors_file.write(tmp_path / "b.safetensors", {"x": Converted(stored["bf16"], torch.float32)})
    assert torch.equal(safetensors_file.read_header(tmp_path / "b.safetensors")[0]["x"].read(), tensors["bf16"].float())


@pytest.mark.parametrize("damage", ["truncated", "offsets", "header"])
def test_damaged_safetensors_headers_are_named(tmp_path, damage):
    path = tmp_path / "a.safetensors"
    safetensors_file.write(path, {"x": torch.randn(64)})
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:-10]
    elif damage == "offsets":
        raw = raw.replace(b'"data_offsets":[0,256]', b'"data_offsets":[0,999]')
    else:
        raw[8] = 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(safetensors_file.SafetensorsError, match="a.safetensors"):
        safetensors_file.read_header(path)


def test_activation_store_spills_past_its_limit_and_reads_back_exactly(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(2, 16, 8) for _ in range(5)]
    store = ActivationStore(limit=2 * batches[0].numel() * 4, directory=tmp_path)
    for t in batches:
        store.append(t)
    assert store.spilled == 3 and store.in_memory == 2 * batches[0].numel() * 4
    assert all(torch.equal(a, b) for a, b in zip(store, batches))
    store[4] = batches[0] * 2  # replacing a spilled item spills again, under the same name
    assert torch.equal(store[4], batches[0] * 2)
    spill = next(tmp_path.iterdir())
    assert len(list(spill.iterdir())) == 3
    store.close()
    assert not spill.exists()


def _quantize(folder, lazy: bool, out: Path, memory=None):
    model, tok = load_model(str(folder), "float32", lazy=lazy)
    cal = make_windows(tok, "wiki", "calib", 64, 6)
    ampq.quantize(model, "int4-g32", algorithm="gptq", calibration=cal, clip=True, bias_correction=True,
                  batch_size=2, progress=False, memory=memory)
    ampq.save(model, out, tok)
    return model


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_lazy_model_with_spilled_activations_gives_the_same_bytes(tmp_path, model_dir):  # noqa: F811
    _quantize(model_dir, False, tmp_path / "eager")
    cap = MemoryCap(64 * GB, tmp_path / "spill", activations=0)  # every batch goes to disk
    model = _quantize(model_dir, True, tmp_path / "lazy", cap)
    assert _files(tmp_path / "lazy") == _files(tmp_path / "eager")
    # the unquantized embeddings and head were never read into the model: streamed at save time
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert weights_of(model) is not None
    assert not any((tmp_path / "spill").iterdir())  # spilled files removed


def test_lazy_model_refuses_what_its_files_do_not_hold(tmp_path, model_dir):  # noqa: F811
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    state = load_file(folder / "model.safetensors")
    state.pop("model.layers.3.mlp.up_proj.weight")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(AmpqError, match=r"stores no tensor model\.layers\.3\.mlp\.up_proj\.weight"):
        load_model(str(folder), lazy=True)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ampq", "quantize", *args], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


def test_cap_below_the_work_is_refused_with_the_least_that_works(tmp_path, model_dir):  # noqa: F811
    r = _cli(str(model_dir), "-s", "gptq", "--calib-windows", "4", "--calib-window", "64", "--max-memory", "200MB",
             "-o", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--max-memory 0.20 GB is below what quantizing one block at a time needs" in r.stderr
    assert "give at least" in r.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,message", [(["--eval"], "--eval keeps the original model in memory"),
                                           (["--adaptive", "4:8"], "--adaptive measures every level"),
                                           (["--budget", "4.5", "--sensitivity", "nowhere.json"],
                                            "--max-memory cannot measure sensitivity")])
def test_what_needs_the_whole_model_is_refused_under_a_cap(tmp_path, model_dir, extra, message):  # noqa: F811
    r = _cli(str(model_dir), "--max-memory", "8GB", *extra, "-o", str(tmp_path / "o"))
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_qwen_in_float32_quantizes_under_a_cap_below_its_size(tmp_path):
    """qwen2.5-coder-0.5b in float32 is 2.52 GB (its linears alone 1.43 GB); GPTQ with calibration
    under a 1.5 GB cap, peak resident memory read by the kernel for the process that did it."""
    from ampq.builtin import fetch_model

    source = fetch_model("qwen2.5-coder-0.5b")
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    cap = int(1.5 * GB)
    assert size > cap + GB // 2
    out = tmp_path / "q"
    log = tmp_path / "log.txt"
    # the child's own peak, as the kernel counted it (through a small launcher: see run_measured)
    code, peak = run_measured([sys.executable, "-m", "ampq", "quantize", "qwen2.5-coder-0.5b", "--dtype", "float32",
                               "-s", "gptq", "--calib-windows", "8", "--calib-window", "256", "--max-memory", "1.5GB",
                               "-o", str(out)], log, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    text = log.read_text()
    assert code == 0, text[-2000:]
    assert 0.5 * GB < peak < cap, f"peak {peak / GB:.2f} GB\n{text[-1000:]}"
    assert "peak resident memory" in text and "of the 1.50 GB cap" in text
    from ampq.io.checkpoint import verify_checkpoint

    manifest = verify_checkpoint(out)
    assert len(manifest["layers"]) == 24 * 7
    assert {e["format"] for e in manifest["layers"].values()} == {"int4-g128"}
    # the embeddings went from the source file to the output without being changed
    src = safetensors_file.read_header(source / "model.safetensors")[0]["model.embed_tokens.weight"]
    got = safetensors_file.read_header(out / "model.safetensors")[0]["model.embed_tokens.weight"]
    assert torch.equal(src.read()[:1000], got.read()[:1000])


@pytest.mark.parametrize("tie", [True, False])
def test_lazy_model_with_its_head_quantized_gives_the_same_bytes(tmp_path, tie):
    from test_model_io import tiny_llama

    from transformers import AutoTokenizer

    from ampq.builtin import fetch_model

    folder = tmp_path / "m"
    tiny_llama(tie=tie).save_pretrained(folder)
    AutoTokenizer.from_pretrained(fetch_model("smollm2-135m")).save_pretrained(folder)  # a folder users would have
    outs = []
    for lazy in (False, True):
        model, _ = load_model(str(folder), "float32", lazy=lazy)
        ampq.quantize(model, "int4-g32", lm_head=True, progress=False, memory=MemoryCap(64 * GB) if lazy else None)
        ampq.save(model, tmp_path / f"o{int(lazy)}")
        outs.append(_files(tmp_path / f"o{int(lazy)}"))
    assert outs[0] == outs[1]
    # the embedding (once tied to the head) went back to disk after the head was quantized
    assert model.get_input_embeddings().weight.device.type == "meta"
