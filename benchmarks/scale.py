"""Per-block stage times and peak memory on the device at hand for real model shapes (one decoder
block with random weights; timing does not need trained ones), projected to the whole model.

    python benchmarks/scale.py --device cuda                       # Llama-3.1-8B, Qwen2.5-7B, Llama-3.1-70B shapes
    python benchmarks/scale.py --device cuda --calib 512x2048      # llm-compressor's usual calibration
    python benchmarks/scale.py --device cpu --models smollm2-135m --calib 16x512   # a check that runs anywhere

Stages, each on one block through the library's own code (ampq.placement: the block onloaded to
the device, calibration activations kept on it): ``calibration`` (capture and every group's X^T X),
``fisher`` (the block-by-block Fisher passes over 8 windows, output head included), ``sensitivity``
(the whole measurement over the default candidates, Fisher included), ``gptq`` (uniform GPTQ
int4-g128 with its own calibration). The projection multiplies by the number of blocks: uniform
GPTQ = blocks x gptq; AMPQ --budget = blocks x (sensitivity + gptq), the plan's quantization
costed as uniform GPTQ. Shapes are in benchmarks/configs/ (their published config.json values).
Results go to benchmarks/results/scale/scale-DEVICE.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _machine import describe, machine  # noqa: E402


def one_block(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((HERE / "configs" / f"{name}.json").read_text())
    blocks = cfg["num_hidden_layers"]
    config = AutoConfig.for_model(**{**cfg, "num_hidden_layers": 1})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.config.ampq_source = f"scale-{name}"
    return model, blocks


def timed(placement, stage: str, fn):
    with placement.stage(stage):
        fn()
    return placement.seconds[stage], placement.peaks[stage]


def measure_shape(name: str, device: str, windows: int, window: int, dtype: torch.dtype) -> dict:
    import ampq
    from ampq.calibrate import Calibration
    from ampq.fisher import output_fisher
    from ampq.placement import Placement, parse_device
    from ampq.report import block_linear_names
    from ampq.schemes import get_scheme
    from ampq.sensitivity import measure

    model, blocks = one_block(name, dtype)
    tokens = torch.randint(0, model.config.vocab_size, (windows, window), generator=torch.Generator().manual_seed(0))
    row = {"model": name, "blocks": blocks, "calib": f"{windows}x{window}", "dtype": str(dtype).removeprefix("torch.")}
    p = Placement(parse_device(device))

    def calibrate():
        cal = Calibration(model, tokens, 8, placement=p)
        for _, block in cal.on_device():
            cal.stats_all(block, cal.groups(block))

    stages = {"calibration": calibrate,
              "fisher": lambda: output_fisher(model, tokens[:8].clone(), block_linear_names(model), progress=False,
                                              placement=p),
              "sensitivity": lambda: measure(model, tokens, progress=False, placement=p),
              "gptq": lambda: ampq.quantize(model, get_scheme("gptq"), calibration=tokens, device=device,
                                            progress=False)}
    for stage, fn in stages.items():
        seconds, peak = timed(p, stage, fn)
        row[stage] = {"seconds": round(seconds, 3), "peak_gb": round(peak / 1e9, 3)}
        print(f"  {name} {stage}: {seconds:.2f} s per block, peak {peak / 1e9:.2f} GB", flush=True)
    row["projected_uniform_gptq_s"] = round(blocks * row["gptq"]["seconds"], 1)
    row["projected_ampq_budget_s"] = round(blocks * (row["sensitivity"]["seconds"] + row["gptq"]["seconds"]), 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default="llama-3.1-8b,qwen2.5-7b,llama-3.1-70b")
    ap.add_argument("--calib", default="128x512", help="WINDOWSxTOKENS, comma-separated for several")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from ampq.placement import parse_device

    device = parse_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    m = machine()
    print(f"on {describe(m)}; device {device}", flush=True)
    rows = []
    for calib in args.calib.split(","):
        windows, window = map(int, calib.lower().split("x"))
        for name in args.models.split(","):
            rows.append(measure_shape(name.strip(), str(device), windows, window, dtype))
    print("\n| model | calibration | calibration s | fisher s | sensitivity s | gptq s | peak GB | uniform GPTQ, whole model | "
          "AMPQ --budget, whole model |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = max(r[s]["peak_gb"] for s in ("calibration", "fisher", "sensitivity", "gptq"))
        times = " | ".join(f"{r[s]['seconds']:.2f}" for s in ("calibration", "fisher", "sensitivity", "gptq"))
        print(f"| {r['model']} | {r['calib']} | {times} | {peak:.2f} | {r['projected_uniform_gptq_s']:.0f} s | "
              f"{r['projected_ampq_budget_s']:.0f} s |")
    out = Path(args.out or HERE / "results" / "scale" / f"scale-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": m, "device": str(device), "rows": rows}, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
