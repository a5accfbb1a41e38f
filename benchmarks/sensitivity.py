"""How well each sensitivity estimator predicts the damage it stands for.

    python benchmarks/sensitivity.py [--models smollm2-135m] [--every 1] [--candidates int3-g128:gptq,...]

For each sampled linear x candidate: the Hessian estimate, the Fisher estimate (both from
ampq.sensitivity.measure on calibration text) and the ground truth, the KL to the original measured
end to end on held-out windows with only that layer quantized. Reports Spearman rank correlations
of each estimator with the ground truth, across layers for each candidate (what the allocator needs
to trade layers against each other) and pooled over every pair; plus the ratio estimate / measured
for the Fisher estimate, which claims the KL's unit. Writes benchmarks/results/sensitivity/sensitivity.json, .md
and a scatter plot sensitivity.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import Reference, evaluate  # noqa: E402
from ampq.report import block_linear_names, print_table  # noqa: E402
from ampq.calibrate import LayerStats  # noqa: E402
from ampq.sensitivity import Candidate, SensitivityTable, measure  # noqa: E402

ESTIMATORS = ("hessian", "fisher")


def run(model_name: str, args) -> dict:
    model, tok = ampq.load_model(model_name)
    names = block_linear_names(model)
    sampled = set(names[::args.every])
    calib = make_windows(tok, args.calib, "calib", args.calib_window, args.calib_windows)
    held_out = make_windows(tok, args.eval, "eval", args.eval_window, args.eval_windows)
    # the original runs beside each evaluation (ampq.evaluation streams, keeps no log-probabilities),
    # so it must be a copy: the model itself has one layer swapped at a time
    reference = Reference(copy.deepcopy(model), held_out)
    evaluate(model, held_out, reference, progress=False)
    truth: dict[str, dict[str, float]] = {}

    def measure_truth(name, cand, deq):
        if name not in sampled or cand.name not in args.candidates:
            return
        weight = model.get_submodule(name).weight
        saved = weight.detach().clone()
        weight.copy_(deq.to(weight.dtype))
        try:
            truth.setdefault(name, {})[cand.name] = evaluate(model, held_out, reference, progress=False).kl
        finally:
            weight.copy_(saved)

    t0 = time.perf_counter()
    if args.table:
        table = reuse_table(model, calib, args, sampled, measure_truth)
    else:
        table = measure(model, calib, args.candidates, estimator="fisher", gradient_windows=args.gradient_windows,
                        on_candidate=measure_truth, progress=True)
    seconds = time.perf_counter() - t0
    pairs = [(layer, cand) for layer in truth for cand in truth[layer]]
    result = {"model": model_name, "layers": len(truth), "of_layers": len(names), "seconds": seconds,
              "calib_windows": args.calib_windows, "gradient_windows": args.gradient_windows,
              "eval_windows": args.eval_windows, "eval_window": args.eval_window, "spearman": {}, "points": []}
    for layer, cand in pairs:
        result["points"].append({"layer": layer, "candidate": cand, "kl": truth[layer][cand],
                                 **{e: table.estimates[e][layer][cand] for e in ESTIMATORS}})
    groups = {c: [p for p in result["points"] if p["candidate"] == c] for c in args.candidates}
    groups["pooled"] = result["points"]
    for group, points in groups.items():
        if len(points) < 3:
            continue
        kl = [p["kl"] for p in points]
        result["spearman"][group] = {e: float(spearmanr([p[e] for p in points], kl).statistic) for e in ESTIMATORS}
        ratio = np.array([p["fisher"] / p["kl"] for p in points if p["kl"] > 0])
        result["spearman"][group]["fisher_over_kl_median"] = float(np.median(ratio)) if len(ratio) else None
    return result


def reuse_table(model, calib, args, sampled: set[str], measure_truth) -> SensitivityTable:
    """The estimates of a saved table (``--table``: one a quality or plan run measured, hours for a
    1.5B model here), and the ground truth of the sampled layers: each candidate quantized from the
    same float-model calibration statistics the table's measurement used (every linear's inputs with
    the model unquantized), then put in alone and scored."""
    table = SensitivityTable.load(args.table)
    missing = [c for c in args.candidates if c not in table.candidates]
    if missing:
        raise SystemExit(f"{args.table} has no estimates for {', '.join(missing)}; it holds {', '.join(table.candidates)}")
    if table.calibration.get("windows") not in (None, args.calib_windows):
        print(f"note: the table was measured on {table.calibration['windows']} calibration windows, the ground "
              f"truth quantizes from {args.calib_windows}", file=sys.stderr)
    stats, hooks = {}, []
    for name in sampled:
        linear = model.get_submodule(name)
        stats[name] = LayerStats.empty(linear.in_features, "cpu")
        hooks.append(linear.register_forward_pre_hook(lambda m, a, n=name: stats[n].add(a[0])))
    with torch.inference_mode():
        for i in range(0, len(calib.tokens), 4):
            model(calib.tokens[i:i + 4], use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for name in sorted(sampled):
            weight = model.get_submodule(name).weight.detach().float()
            for cand in map(Candidate.parse, args.candidates):
                measure_truth(name, cand, cand.dequantized(weight, stats[name]))
            print(f"{name}: ground truth measured", flush=True)
    return table


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 4.2 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        for ax, est in zip(row, ESTIMATORS):
            for cand in sorted({p["candidate"] for p in res["points"]}):
                pts = [p for p in res["points"] if p["candidate"] == cand and p["kl"] > 0 and p[est] > 0]
                ax.scatter([p[est] for p in pts], [p["kl"] for p in pts], s=9, label=cand, alpha=0.7)
            ax.set_xscale("log")
            ax.set_yscale("log")
            rho = res["spearman"].get("pooled", {}).get(est, float("nan"))
            ax.set_title(f"{res['model']}: {est} (pooled Spearman {rho:.2f})")
            ax.set_xlabel(f"{est} estimate" + (" (nats)" if est == "fisher" else ""))
            ax.set_ylabel("measured KL, one layer quantized (nats/token)")
            if est == "fisher":
                lo, hi = ax.get_xlim()
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="estimate = measured")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--candidates", default="int3-g128:gptq,int4-g128:gptq,int8-ch:rtn")
    p.add_argument("--every", type=int, default=1, help="measure the ground truth on every N-th linear")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--calib-window", type=int, default=512)
    p.add_argument("--gradient-windows", type=int, default=8)
    p.add_argument("--eval", default="c4", help="held-out text for the ground truth (another text than --calib)")
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sensitivity" / "sensitivity.json"))
    p.add_argument("--merge", nargs="*", default=[], help="fold in the results of other runs of this script, then report")
    p.add_argument("--table", default=None, help="a saved sensitivity table of the model (one model only) to take the "
                   "estimates from instead of measuring them; give the calibration it was measured with")
    args = p.parse_args()
    args.candidates = [c for c in args.candidates.split(",") if c]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text())["results"] if out.exists() else []
    results = [r for r in previous if r["model"] not in args.models.split(",")]
    info = machine()
    if args.merge:
        for other in args.merge:
            extra = json.loads(Path(other).read_text())["results"]
            results = [r for r in previous if r["model"] not in {e["model"] for e in extra}] + extra
            previous = results
        args.models = ""
    for model_name in [m for m in args.models.split(",") if m]:
        results.append(run(model_name, args))
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"machine": info, "results": results}, indent=1))
        os.replace(tmp, out)
    if args.merge:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"machine": info, "results": results}, indent=1))
        os.replace(tmp, out)
    rows = []
    for r in results:
        for group, s in r["spearman"].items():
            rows.append([r["model"], f"{r['layers']}/{r['of_layers']}", group, f"{s['hessian']:.3f}",
                         f"{s['fisher']:.3f}", f"{s['fisher_over_kl_median']:.2f}" if s["fisher_over_kl_median"] else "-"])
    head = ["model", "layers", "candidate", "Spearman hessian", "Spearman fisher", "median fisher / KL"]
    runs = "; ".join(f"{r['model']}: ground truth on {r['eval_windows']} x {r['eval_window']} tokens, estimates from "
                     f"{r['calib_windows']} windows ({r['gradient_windows']} with backward passes)" for r in results)
    note = (f"{describe(info)}; ground truth: KL to the original on held-out {args.eval} tokens with only that layer "
            f"quantized, estimates from {args.calib} calibration windows; {runs}")
    print_table("sensitivity estimators against the measured KL", head, rows, note)
    md = [f"Measured on {note}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
