"""Time the exact allocator on a problem of realistic size (default 500 linears x 12 candidates,
q/k/v and gate/up tied), at budgets across the reachable range.

    python benchmarks/allocate.py [--layers 500] [--candidates 12]

Prints a table and writes benchmarks/results/allocate/allocate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

from ampq.allocate import allocate, reachable  # noqa: E402
from ampq.report import print_table  # noqa: E402


def problem(layers: int, candidates: int, seed: int):
    rng = np.random.default_rng(seed)
    damage, nbytes, groups = {}, {}, []
    for i in range(layers):
        size = int(rng.choice([576 * 576, 576 * 1536, 896 * 4864]))
        sens = float(rng.lognormal(0, 2))
        bits = np.sort(rng.uniform(2.5, 16, candidates))
        damage[f"l{i}"] = {f"c{j}": sens * 2.0 ** (-2 * b) for j, b in enumerate(bits)}
        nbytes[f"l{i}"] = {f"c{j}": int(size * b / 8) for j, b in enumerate(bits)}
    for i in range(0, layers - 6, 7):  # q/k/v-like triples and gate/up-like pairs
        groups.append([f"l{i}", f"l{i + 1}", f"l{i + 2}"])
        groups.append([f"l{i + 4}", f"l{i + 5}"])
    # tied layers need a common candidate set: give each group its first member's sizes
    for g in groups:
        for name in g[1:]:
            nbytes[name] = dict(nbytes[g[0]])
    return damage, nbytes, groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=500)
    p.add_argument("--candidates", type=int, default=12)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "allocate" / "allocate.json"))
    args = p.parse_args()
    rows = []
    for seed in range(args.seeds):
        damage, nbytes, groups = problem(args.layers, args.candidates, seed)
        lo, hi = reachable(nbytes, groups)
        for share in (0.05, 0.25, 0.5, 0.75, 0.95):
            budget = int(lo + share * (hi - lo))
            t0 = time.perf_counter()
            result = allocate(damage, nbytes, budget, groups)
            seconds = time.perf_counter() - t0
            assert result.bytes <= budget
            rows.append({"seed": seed, "budget_share": share, "seconds": seconds, "optimal": result.optimal})
    info = machine()
    times = [r["seconds"] for r in rows]
    summary = {"median_s": statistics.median(times), "max_s": max(times), "all_optimal": all(r["optimal"] for r in rows)}
    print_table(f"allocation of {args.layers} linears x {args.candidates} candidates ({len(rows)} solves)",
                ["median ms", "max ms", "all proven optimal"],
                [[summary["median_s"] * 1e3, summary["max_s"] * 1e3, str(summary["all_optimal"])]], describe(info))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": info, "layers": args.layers, "candidates": args.candidates,
                               "summary": summary, "rows": rows}, indent=2))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
