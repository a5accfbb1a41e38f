"""Devices and ranks (issue 19) on the CPU: a run spread over 1, 2 or 3 gloo ranks writes the same
checkpoint bytes; the Fisher pass block by block equals one backward pass through the whole model;
work is shared out deterministically; bad devices are refused in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ampq import AmpqError
from ampq.fisher import output_fisher
from ampq.placement import Placement, parse_device, placement_for
from ampq.ranks import Ranks
from ampq.report import block_linear_names
from test_model_io import tiny_llama
from test_resume import model_dir  # noqa: F401  (a fixture: a 12-block random Llama with a tokenizer)

WORKER = Path(__file__).with_name("_ranks_worker.py")


def _run(out: Path, ranks: int, spec: str, cache: Path, dtype: str = "float32") -> dict[str, bytes]:
    env = dict(os.environ, AMPQ_CACHE=str(cache), OMP_NUM_THREADS="1", AMPQ_RANK_TIMEOUT="120",
               AMPQ_CALIB_DTYPE=dtype)
    if ranks == 1:
        cmd = [sys.executable, str(WORKER), str(out), spec]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(WORKER), str(out), spec]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("spec,dtype", [("budget", "float32"), ("gptq", "float32"), ("budget", "bfloat16")])
def test_checkpoint_bytes_do_not_depend_on_the_rank_count(tmp_path, spec, dtype):
    # budget: sensitivity (Fisher passes, Hessians, GPTQ and clip candidates) spread over ranks, then
    # quantization; gptq: GPTQ with bias correction, each group's linears spread over ranks;
    # bfloat16: the calibration passes as a processor with bf16 matrix instructions runs them
    one = _run(tmp_path / "one", 1, spec, tmp_path / "cache1", dtype)
    two = _run(tmp_path / "two", 2, spec, tmp_path / "cache2", dtype)
    three = _run(tmp_path / "three", 3, spec, tmp_path / "cache3", dtype)
    assert one.keys() == two.keys() == three.keys() and "ampq.json" in one
    for name in one:
        assert one[name] == two[name] == three[name], name
    assert not list(tmp_path.glob(".*ampq-resume"))  # progress removed once written


def _reference_fisher(model, tokens, names, seed=0):
    """One forward and backward pass through the whole model per window (the estimate as first written)."""
    sums = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}

    def hook(name):
        def on_grad(g):
            sums[name].add_(g.reshape(-1, g.shape[-1]).double().pow(2).sum(0))

        def on_output(module, args, out):
            out.register_hook(on_grad)

        return on_output

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in range(tokens.shape[0]):
        x = model.get_input_embeddings()(tokens[w:w + 1]).detach().requires_grad_(True)
        flat = model(inputs_embeds=x, use_cache=False).logits.float().flatten(0, 1)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed + w)
            labels = torch.multinomial(torch.softmax(flat, -1), 1, generator=gen).squeeze(1)
        nn.functional.cross_entropy(flat, labels, reduction="sum").backward()
    for h in handles:
        h.remove()
    return {n: (s / tokens.numel()).float() for n, s in sums.items()}


def test_fisher_block_by_block_equals_the_whole_model_pass():
    tokens = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    model = tiny_llama()
    names = block_linear_names(model)
    ours = output_fisher(model, tokens, names, progress=False)
    reference = _reference_fisher(tiny_llama(), tokens, names)
    for n in names:
        torch.testing.assert_close(ours[n], reference[n], rtol=1e-6, atol=0)
    assert all(p.requires_grad for p in model.parameters())  # given back as they were


def test_owners_balance_the_work_and_agree_everywhere():
    costs = [9.0, 1.0, 1.0, 4.0, 4.0]
    owners = Ranks(0, 2).owners(costs)
    assert owners == Ranks(1, 2).owners(costs)  # every rank computes the same split
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(load) == [9.0, 10.0]
    assert Ranks().owners(costs) == [0] * 5
    assert Ranks(1, 3).batches(7) == [1, 4] and Ranks(0, 3).rounds(7) == 3
    with pytest.raises(AmpqError, match="2 calibration batches cannot feed 3 ranks"):
        Ranks(0, 3).batches(2)


def test_one_rank_folds_batch_by_batch():
    totals = [torch.zeros(3)]
    for p in ([torch.ones(3)], None, [torch.full((3,), 2.0)]):
        Ranks().fold(totals, p)
    assert torch.equal(totals[0], torch.full((3,), 3.0))


def test_devices_are_checked_in_one_line():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(AmpqError, match="unknown device 'gpu0'"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(AmpqError, match="this torch sees no GPU"):
            parse_device("cuda:1")
        with pytest.raises(AmpqError, match="this torch sees no GPU"):
            parse_device("0")
    with pytest.raises(AmpqError, match="--max-gpu-memory caps a GPU"):
        Placement(torch.device("cpu"), max_memory=10**9)
    assert placement_for(tiny_llama(), "cpu").device == torch.device("cpu")


def test_quantize_on_a_device_reports_each_stage(capsys):
    import ampq

    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    ampq.quantize(tiny_llama(), "int4-g64", algorithm="gptq", calibration=calib, device="cpu", progress=True)
    assert "peak resident memory (CPU, process peak so far) per stage: quantize" in capsys.readouterr().err


def test_cli_devices_starts_the_ranks_itself(tmp_path, model_dir):
    # `ampq quantize --devices cpu,cpu` launches two ranks with torch's elastic launcher
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", AMPQ_RANK_TIMEOUT="120")
    args = ["-s", "gptq", "-f", "int4-g64", "--calib-windows", "16", "--calib-window", "32"]
    outs = {}
    for name, where in (("one", ["--device", "cpu"]), ("two", ["--devices", "cpu,cpu"])):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "ampq", "quantize", str(model_dir), *args, *where, "-o", str(out)],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    assert outs["one"] == outs["two"]
    bad = subprocess.run([sys.executable, "-m", "ampq", "quantize", str(model_dir), "--devices", "cpu,cpu", "--eval",
                          "-o", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("ampq: error: --eval runs in one process")
