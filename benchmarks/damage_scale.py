"""How far the allocator's summed damage estimate is from the KL it predicts, candidate by candidate:
for each candidate (format + algorithm), every linear of the decoder blocks quantized in it, the
measured KL to the original on held-out text over the sum of the per-layer estimates.

The allocator compares candidates by their summed estimates. A constant factor between estimate and
measurement changes no plan; a factor that differs between candidates does, because the allocator
then trades one candidate for another at the wrong price. So the figure that matters is how the
ratio varies across formats and algorithms, not its size.

    python benchmarks/damage_scale.py --models smollm2-135m --candidates int4-g128:rtn,int4-g128:gptq

Writes benchmarks/results/damage_scale/damage_scale.json (rows kept per model) and its Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402
from _rows import measure_models  # noqa: E402

import ampq  # noqa: E402
from ampq.algorithms.gptq import DAMP  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import Reference, evaluate  # noqa: E402
from ampq.sensitivity import Candidate, measure  # noqa: E402

CANDIDATES = ("int3-g128:rtn,int3-g128:gptq,int4-g128:rtn,int4-g128:gptq,int5-g128:rtn,int5-g128:gptq,"
              "nf4-b64-dq:gptq,int8-ch:rtn")
OUT = Path(__file__).parent / "results" / "damage_scale" / "damage_scale.json"


def measure_model(model_name: str, candidates: list[str], calib_windows: int, eval_windows: int) -> dict:
    original, tok = ampq.load_model(model_name)
    calib = make_windows(tok, "mix", "calib", 512, calib_windows)
    held_out = make_windows(tok, "wiki", "eval", 512, eval_windows)
    reference = Reference(original, held_out)
    t0 = time.perf_counter()
    table = measure(original, calib, candidates, progress=False)
    seconds = time.perf_counter() - t0
    rows = {}
    for name in candidates:
        cand = Candidate.parse(name)
        predicted = sum(table.damage[layer][name] for layer in table.damage)
        model = copy.deepcopy(original)
        ampq.quantize(model, cand.format, algorithm=cand.algorithm, calibration=calib, progress=False)
        kl = evaluate(model, held_out, reference, progress=False).kl
        rows[name] = {"predicted_kl": predicted, "measured_kl": kl, "measured_over_predicted": kl / predicted}
        print(f"[{model_name}] {name}: predicted {predicted:.4f}, measured {kl:.4f} ({kl / predicted:.2f}x)", flush=True)
        del model
    return {"model": model_name, "calib": "mix", "calib_windows": calib_windows, "eval_windows": eval_windows,
            "gptq_damp": DAMP, "layers": len(table.damage), "sensitivity_seconds": seconds, "candidates": rows}


def markdown(result: dict) -> str:
    rows = result["rows"]
    cands = list(dict.fromkeys(c for r in rows for c in r["candidates"]))
    lines = [f"Machine: {describe(result['machine'])}. Each candidate in every linear of the decoder blocks; "
             "predicted: the sum of the per-layer Fisher estimates the allocator adds (calibration `mix`); "
             "measured: the KL to the original on held-out `wiki` (nats per token). Cells: measured / predicted "
             "(the predicted and measured KL in brackets).", "",
             "| candidate | " + " | ".join(f"{r['model']} ({r['calib_windows']} calibration, {r['eval_windows']} "
                                          f"held-out windows, GPTQ damp {r['gptq_damp']:g})" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for c in cands:
        cells = []
        for r in rows:
            v = r["candidates"].get(c)
            cells.append("" if v is None else f"{v['measured_over_predicted']:.2f}x ({v['predicted_kl']:.4f} / "
                                              f"{v['measured_kl']:.4f})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--candidates", default=CANDIDATES)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--windows", type=int, default=8, help="held-out evaluation windows of 512 tokens")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    measure_models(Path(args.out), args.models.split(","),
                   lambda m: measure_model(m, candidates, args.calib_windows, args.windows), markdown)


if __name__ == "__main__":
    main()
