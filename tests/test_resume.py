"""A quantization killed at a random moment (SIGKILL) and started again with the same arguments
finishes from where it was and writes the same bytes as a run that was never killed."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ampq
from ampq.resume import Resume, progress_dir
from test_model_io import tiny_llama

CALIB = ["--calib-windows", "4", "--calib-window", "64"]
BLOCKS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 12-block Llama with SmolLM2's tokenizer: each block quantizes in a fraction of a
    second, so a run takes seconds and can still be killed between and inside blocks."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ampq.builtin import fetch_model

    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=BLOCKS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("resume") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _cmd(model: Path, out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ampq", "quantize", str(model), *args, *CALIB, "-o", str(out)]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("seed,args", [(0, ["-s", "gptq", "-f", "int4-g64"]),
                                       (1, ["-f", "int4-g32", "--bias-correction", "--clip"]),
                                       (2, ["-s", "gptq", "-f", "int4-g64", "--max-memory", "16GB"]),
                                       (3, ["--adaptive", "4:8", "-f", "int4-g64"])])
def test_sigkill_then_rerun_gives_the_same_bytes(tmp_path, model_dir, seed, args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    whole = tmp_path / "whole"
    subprocess.run(_cmd(model_dir, whole, args), check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    progress = progress_dir(killed)
    proc = subprocess.Popen(_cmd(model_dir, killed, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    rng = random.Random(seed)
    target = rng.randint(1, BLOCKS - 2)  # a random block, then a random moment inside the next ones
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        state = progress / "state.json"
        if state.exists() and json.loads(state.read_text())["blocks"] >= target:
            time.sleep(rng.random() * 0.2)
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "ampq.json").exists()
    done = json.loads((progress / "state.json").read_text())["blocks"]
    assert 1 <= done < BLOCKS
    again = subprocess.run(_cmd(model_dir, killed, args), capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming: {done} of {BLOCKS} blocks" in again.stderr
    assert _files(killed) == _files(whole)  # byte for byte, manifest included
    assert not progress.exists()  # cleaned up after the save


def test_resume_restores_finished_blocks_without_requantizing(tmp_path):
    model = tiny_llama()
    calib = torch.randint(0, model.config.vocab_size, (4, 32))
    key = {"test": 1}
    first = Resume(tmp_path / "p", key)
    reference = ampq.quantize(tiny_llama(), "int4-g32", algorithm="gptq", calibration=calib, progress=False)
    ampq.quantize(model, "int4-g32", algorithm="gptq", calibration=calib, progress=False, resume=first)
    second = Resume(tmp_path / "p", key)
    assert second.done == len(model.model.layers)
    fresh = tiny_llama()
    ampq.quantize(fresh, "int4-g32", algorithm="gptq", calibration=calib, progress=False, resume=second)
    ids = calib[:1]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, reference(ids).logits)
    assert Resume(tmp_path / "p", {"test": 2}).done == 0  # other arguments: start afresh


def test_damaged_progress_is_named(tmp_path):
    model = tiny_llama()
    first = Resume(tmp_path / "p", {"k": 1})
    ampq.quantize(model, "int4-g32", progress=False, resume=first)
    (tmp_path / "p" / "block-00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(ampq.AmpqError, match="progress in .* is damaged.*delete that folder"):
        ampq.quantize(tiny_llama(), "int4-g32", progress=False, resume=Resume(tmp_path / "p", {"k": 1}))


class _Killed(Exception):
    pass


def test_sensitivity_resumes_after_the_last_measured_block(tmp_path):
    from ampq.sensitivity import measure

    candidates = ["int4-g32:gptq", "int8-ch:rtn"]
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    whole = measure(tiny_llama(), calib, candidates, gradient_windows=2, progress=False)
    key = {"sensitivity": 1}
    resume = Resume(tmp_path / "p", key)
    original_save = resume.save

    def crash_after_first_block(i, *args, **kwargs):  # a kill right after block 0 was recorded
        original_save(i, *args, **kwargs)
        raise _Killed

    resume.save = crash_after_first_block
    with pytest.raises(_Killed):
        measure(tiny_llama(), calib, candidates, gradient_windows=2, progress=False, resume=resume)
    again = Resume(tmp_path / "p", key)
    assert again.done == 1 and again.tensors("fisher") is not None
    resumed = measure(tiny_llama(), calib, candidates, gradient_windows=2, progress=False, resume=again)
    assert resumed.estimates == whole.estimates and resumed.nbytes == whole.nbytes  # exactly, float for float


def test_a_kill_after_the_next_inputs_are_written_but_before_the_block_counts(tmp_path, monkeypatch):
    """The moment CI once hit: block 1's calibration inputs are on disk, its state is not; the
    resumed run must continue from block 0's inputs, not refuse the progress as damaged."""
    from ampq import resume as resume_module

    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    reference = ampq.quantize(tiny_llama(), "int4-g32", algorithm="gptq", calibration=calib, progress=False)
    key = {"kill-between-files": 1}
    original = resume_module.save_file

    def killed_on_block_1(state, path, metadata=None):
        if ".block-00001." in str(path):
            raise _Killed
        return original(state, path, metadata=metadata)

    monkeypatch.setattr(resume_module, "save_file", killed_on_block_1)
    with pytest.raises(_Killed):
        ampq.quantize(tiny_llama(), "int4-g32", algorithm="gptq", calibration=calib, progress=False,
                      resume=Resume(tmp_path / "p", key))
    monkeypatch.setattr(resume_module, "save_file", original)
    again = Resume(tmp_path / "p", key)
    assert again.done == 1
    fresh = ampq.quantize(tiny_llama(), "int4-g32", algorithm="gptq", calibration=calib, progress=False, resume=again)
    with torch.no_grad():
        assert torch.equal(fresh(calib[:1]).logits, reference(calib[:1]).logits)


def test_an_adaptive_block_is_restored_with_the_levels_it_holds_aside(tmp_path):
    from ampq.models import decoder_blocks, replace_module
    from ampq.nested import NestedLinear, nest
    from ampq.pipeline.blockwise import quantize_linear

    def adaptive_block():
        torch.manual_seed(0)
        block = decoder_blocks(tiny_llama())[0][1]
        linear = block.mlp.up_proj
        base = quantize_linear("up", linear, "int4-g32")
        formats = ["int4-g32-sym", "int2-g32-sym"]
        layer = NestedLinear(base, formats, nest(base, linear.weight, formats), damage=[3.0, 2.0, 1.0])
        replace_module(block, "mlp.up_proj", layer)
        return block

    block = adaptive_block()
    x = torch.randn(2, block.mlp.up_proj.in_features)
    full = block.mlp.up_proj(x)
    block.mlp.up_proj.set_level(1)  # the second residual goes aside: no checkpoint holds it
    low = block.mlp.up_proj(x)
    resume = Resume(tmp_path / "p", {"k": 1})
    resume.save(0, block, None)
    fresh = decoder_blocks(tiny_llama())[0][1]
    Resume(tmp_path / "p", {"k": 1}).restore(0, fresh)
    restored = fresh.mlp.up_proj
    assert isinstance(restored, NestedLinear) and restored.level == 1 and set(restored.spare) == {2}
    assert restored.residual_formats == ["int4-g32-sym", "int2-g32-sym"] and restored.damage == [3.0, 2.0, 1.0]
    assert torch.equal(restored(x), low)
    restored.set_level(2)
    assert torch.equal(restored(x), full)


def test_a_second_process_writing_the_same_output_is_stopped_until_the_first_ends(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ampq.resume import Resume; r = Resume(sys.argv[1], {'k': 1}); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path / "p")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ampq.AmpqError, match=f"another ampq run \\(process {holder.pid}\\).*wait for it") as e:
            Resume(tmp_path / "p", {"k": 1})
        assert "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    resume = Resume(tmp_path / "p", {"k": 1})  # a killed run's lock goes with it
    ampq.quantize(tiny_llama(), "int4-g32", progress=False, resume=resume)
    resume.finish()
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.lock").exists()


def test_a_run_that_failed_in_this_process_does_not_lock_out_the_next(tmp_path):
    Resume(tmp_path / "p", {"k": 1})  # never finished, as when quantize raised
    resume = Resume(tmp_path / "p", {"k": 1})
    ampq.quantize(tiny_llama(), "int4-g32", progress=False, resume=resume)
    resume.finish()
    assert not (tmp_path / "p.lock").exists()
