"""AMPQ at a range of budgets against every uniform scheme: quality against size.

    python benchmarks/pareto.py [--models smollm2-135m] [--budgets 2.5,3,3.5,4,4.25,4.5,5,6,8]

Per model: one sensitivity table (measured once, then reused from the cache, as `ampq quantize
--budget` does), then for each budget the plan, quantization following it (each layer with its
candidate's algorithm) and evaluation on the held-out halves of wiki and c4: perplexity, KL, bytes,
time, and the KL the allocator predicted (the sum of the plan's Fisher estimates, in nats per token)
next to the KL measured. The uniform schemes come from benchmarks/results/schemes/schemes.json and
uniform/uniform.json rows measured on the same evaluation windows. Writes benchmarks/results/pareto/pareto.json,
.md and pareto-MODEL.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq.pipeline import planner  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import Reference, evaluate  # noqa: E402
from ampq.report import block_linear_names, linear_bits, model_bytes, print_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def ampq_rows(model_name: str, args, save) -> list[dict]:
    model, tok = ampq.load_model(model_name)
    names = block_linear_names(model)
    fixed = planner.fixed_bytes(model, names)
    t0 = time.perf_counter()
    table = planner.sensitivity(model, tok, calib=args.calib, windows=args.calib_windows, window=args.calib_window,
                                estimator=args.estimator)
    measure_s = time.perf_counter() - t0
    calib = make_windows(tok, args.calib, "calib", args.calib_window, args.calib_windows)
    evals = {c: make_windows(tok, c, "eval", 512, args.windows) for c in args.corpora}
    refs = {c: Reference(model, w) for c, w in evals.items()}
    rows = []
    for budget in args.budgets:
        plan = planner.plan_for_budget(table, bits_per_weight=budget, fixed=fixed)
        quantized, _ = ampq.load_model(model_name)
        t0 = time.perf_counter()
        ampq.quantize(quantized, plan, calibration=calib, progress=False)
        seconds = time.perf_counter() - t0
        row = {"model": model_name, "library": "ampq", "label": f"AMPQ ({args.estimator})", "budget": budget,
               "bits_per_weight": linear_bits(quantized), "model_bytes": model_bytes(quantized),
               "quantize_s": seconds, "sensitivity_s": measure_s,
               "predicted_kl": sum(p.damage for p in plan.layers.values()),
               "formats": planner.describe(plan), "eval_windows": args.windows, "calib_windows": args.calib_windows}
        for c in args.corpora:
            row[c] = evaluate(quantized, evals[c], refs[c], progress=False).as_dict()
            row[f"{c}_original"] = refs[c].quality.as_dict()
        print(f"[{model_name}] budget {budget}: {row['bits_per_weight']:.3f} bpw, wiki ppl "
              f"{row['wiki']['perplexity']:.3f}, KL {row['wiki']['kl']:.4f} (predicted {row['predicted_kl']:.4f}), "
              f"{seconds:.0f} s", file=sys.stderr, flush=True)
        rows.append(row)
        save(rows)
        del quantized
    return rows


def uniform_rows(model_name: str, windows: int) -> list[dict]:
    """Rows of the uniform benchmarks measured on the same evaluation windows."""
    rows = []
    for file in ("schemes.json", "uniform.json"):
        path = RESULTS / file.removesuffix(".json") / file
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        found = data.get("rows") or [{**r, "eval_windows": run["windows"]} for run in data.get("runs", [])
                                     for r in run["rows"]]
        for r in found:
            if r.get("model") != model_name or "wiki" not in r or r.get("eval_windows", windows) != windows \
                    or r.get("format", "").startswith("original"):
                continue
            if r.get("library", "ampq") == "ampq":
                label = "ampq " + (r.get("scheme") or "rtn") if file == "schemes.json" else "ampq rtn"
            else:  # a peer: its library and scheme (llm-compressor has GPTQ and AWQ rows)
                label = f"{r['library']} {r['scheme']}" if r.get("scheme") else r["library"]
            rows.append({**r, "label": label, "uniform": True,
                         "name": f"{label} {r.get('format', '')}".strip()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--budgets", default="2.5,3,3.5,4,4.25,4.5,5,6,8")
    p.add_argument("--estimator", default="fisher", choices=["fisher", "hessian"])
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--calib-window", type=int, default=512)
    p.add_argument("--corpora", default="wiki,c4")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "pareto" / "pareto.json"))
    p.add_argument("--report-only", action="store_true", help="redraw the table and figure from --out")
    args = p.parse_args()
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.corpora = args.corpora.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    previous = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in previous if r["model"] not in models or r.get("label") != f"AMPQ ({args.estimator})"
            or r["budget"] not in args.budgets]
    info = machine()
    if args.report_only:
        report(rows + [r for r in previous if r not in rows], models, json.loads(out.read_text())["machine"], out)
        return
    for m in models:
        def save(new, done=list(rows)):  # after every budget, so a long run leaves what it measured
            info["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"machine": info, "rows": done + new}, indent=1))
            os.replace(tmp, out)
        rows += ampq_rows(m, args, save)
    report(rows, models, info, out)


def report(rows: list[dict], models: list[str], info: dict, out: Path) -> None:
    from ampq.cli import pareto_series
    from ampq.figures import pareto_figure

    md = [f"Measured on {describe(info)}.", ""]
    head = ["model", "method", "budget", "bits/weight", "model MB", "ppl wiki", "ppl c4", "KL wiki",
            "predicted KL", "quantize s", "formats"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = []
    for m in models:
        mine = sorted([r for r in rows if r["model"] == m], key=lambda r: r["bits_per_weight"])
        if not mine:
            continue
        windows = mine[0]["eval_windows"]
        others = uniform_rows(m, windows)
        everything = sorted(mine + others, key=lambda r: r["bits_per_weight"])
        o = mine[0]
        table.append([m, "original", "-", 32, "-", o["wiki_original"]["perplexity"], o["c4_original"]["perplexity"],
                      0, "-", "-", "fp32"])
        for r in everything:
            ampq_row = "budget" in r
            table.append([m, r["label"] if ampq_row else r["name"], r.get("budget", "-"), r["bits_per_weight"],
                          r["model_bytes"] / 1e6 if r.get("model_bytes") else None, r["wiki"]["perplexity"],
                          r["c4"]["perplexity"], r["wiki"]["kl"], r.get("predicted_kl"), r.get("quantize_s"),
                          ", ".join(f"{k} x{v}" for k, v in r["formats"].items()) if ampq_row else r.get("format", "")])
        series, original = pareto_series({"rows": [{**r, "label": r["label"]} for r in everything]}, m)
        pareto_figure(series, out.with_name(f"pareto-{m}.png"), original=original,
                      title=f"{m}: wiki perplexity against size ({windows} x 512 held-out tokens)")
    for r in table:
        md.append("| " + " | ".join(_cell(v) for v in r) + " |")
    print_table("AMPQ against uniform schemes", head, table, describe(info))
    versus = [row for m in models for row in against_best_uniform(m, rows)]
    if versus:
        head2 = ["model", "budget", "bits/weight", "AMPQ ppl wiki / c4", "best uniform <= size", "its bits/weight",
                 "its ppl wiki / c4", "ppl increase ratio wiki / c4", "KL wiki AMPQ / its", "AMPQ at or below"]
        md += ["", "AMPQ against the best uniform scheme (lowest wiki perplexity) of equal or smaller size; the "
               "ratio is AMPQ's perplexity increase over the original divided by that scheme's; \"at or below\" "
               "compares perplexity on both texts.", "",
               "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
        md += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in versus]
        print_table("AMPQ against the best uniform scheme of equal or smaller size", head2, versus, describe(info))
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def against_best_uniform(model: str, rows: list[dict], others: list[dict] | None = None) -> list[list]:
    """Per AMPQ budget: the uniform scheme (ampq's or a peer's) with the lowest wiki perplexity among
    those no larger in bits per weight, and how the two compare."""
    mine = sorted([r for r in rows if r["model"] == model and "budget" in r], key=lambda r: r["budget"])
    if not mine:
        return []
    others = uniform_rows(model, mine[0]["eval_windows"]) if others is None else others
    base = {c: mine[0][f"{c}_original"]["perplexity"] for c in ("wiki", "c4")}
    out = []
    for r in mine:
        fits = [u for u in others if u["bits_per_weight"] <= r["bits_per_weight"] + 1e-3]
        if not fits:
            out.append([model, r["budget"], r["bits_per_weight"], _pair(r), "none this small", "-", "-", "-", "-", "-"])
            continue
        best = min(fits, key=lambda u: u["wiki"]["perplexity"])
        ratio = [_ratio(r[c]["perplexity"] - base[c], best[c]["perplexity"] - base[c]) for c in base]
        below = all(r[c]["perplexity"] <= best[c]["perplexity"] for c in base)
        kl = [x["wiki"].get("kl") for x in (r, best)]
        out.append([model, r["budget"], r["bits_per_weight"], _pair(r), best["name"], best["bits_per_weight"],
                    _pair(best), " / ".join(ratio), " / ".join(_cell(k) for k in kl), "yes" if below else "no"])
    return out


def _ratio(mine: float, theirs: float) -> str:
    if theirs <= 1e-6 * max(abs(mine), 1.0):  # the uniform scheme is lossless here
        return "both lossless" if mine <= 1e-6 else "-"
    return f"{mine / theirs:.2f}"


def _pair(r: dict) -> str:
    return f"{_cell(r['wiki']['perplexity'])} / {_cell(r['c4']['perplexity'])}"


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


if __name__ == "__main__":
    main()
