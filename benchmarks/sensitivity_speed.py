"""Time of the sensitivity pass's candidate work, job by job against one shared GPTQ sweep per
group of linears, on the same layers in the same run, and how far the two damages differ.

    python benchmarks/sensitivity_speed.py [--model smollm2-135m] [--blocks 0,12] [--windows 16]

For each chosen decoder block the calibration statistics are gathered once; then every linear x
every default candidate is measured twice: ``one by one`` (each candidate's own algorithm call,
what ampq did before the sweep) and ``sweep`` (:func:`ampq.sensitivity._dequantized_candidates`,
the GPTQ candidates of all linears sharing an input in one column sweep). Both orders are timed in
turn; the ratio is what to read, since other jobs on the machine slow both. Writes
benchmarks/results/sensitivity_speed/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq import atomic  # noqa: E402
from ampq.calibrate import Calibration  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.sensitivity import DEFAULT_CANDIDATES, Candidate, _dequantized_candidates, hessian_damage  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "sensitivity_speed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,12", help="decoder blocks to measure (comma-separated)")
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    model, tok = ampq.load_model(args.model)
    cal = Calibration(model, make_windows(tok, "wiki", "calib", 512, args.windows).tokens, 8)
    wanted = {int(b) for b in args.blocks.split(",")}
    cands = [Candidate.parse(c) for c in DEFAULT_CANDIDATES]
    rows, totals = [], {"one by one": 0.0, "sweep": 0.0}
    with torch.inference_mode():
        for i, (prefix, block) in enumerate(cal.blocks[: max(wanted) + 1]):
            groups = cal.groups(block)
            stats = cal.stats_and_advance(block, groups)
            if i not in wanted:
                continue
            for group in groups:
                st = stats[group[0]]
                weights = {sub: block.get_submodule(sub).weight.detach().float() for sub in group}
                damage, seconds = {}, {}
                for way in ("one by one", "sweep"):
                    start = time.perf_counter()
                    if way == "sweep":
                        found = list(_dequantized_candidates(weights, cands, st))
                    else:
                        found = []
                        for sub, w in weights.items():
                            for c in cands:
                                try:
                                    found.append((sub, c, c.dequantized(w, st)))
                                except ValueError:
                                    pass
                    seconds[way] = time.perf_counter() - start
                    totals[way] += seconds[way]
                    damage[way] = {(s, c.name): hessian_damage(weights[s], d, st.hessian) for s, c, d in found}
                worst = max(abs(damage["sweep"][k] - v) / max(v, 1e-30) for k, v in damage["one by one"].items())
                rows.append({"block": i, "linears": group, "shape": list(weights[group[0]].shape),
                             "seconds": seconds, "speedup": seconds["one by one"] / seconds["sweep"],
                             "max_relative_damage_difference": worst})
                print(f"block {i} {'+'.join(s.split('.')[-1] for s in group):20} one by one {seconds['one by one']:6.2f} s"
                      f"  sweep {seconds['sweep']:6.2f} s  x{rows[-1]['speedup']:.2f}  damage differs <= {worst:.1e}", flush=True)
    result = {"machine": machine(), "load_average": os.getloadavg(), "model": args.model, "candidates": DEFAULT_CANDIDATES,
              "windows": args.windows, "groups": rows, "total_seconds": totals,
              "speedup": totals["one by one"] / totals["sweep"]}
    print(f"total: one by one {totals['one by one']:.1f} s, sweep {totals['sweep']:.1f} s: x{result['speedup']:.2f}"
          f"  ({describe(result['machine'])}, load {result['load_average'][0]:.1f})")
    OUT.mkdir(parents=True, exist_ok=True)
    atomic.write_text(OUT / f"{args.model}.json", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
