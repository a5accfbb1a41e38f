"""Calibration passes in float32 and in bf16 (the default where the processor multiplies bf16
natively, `AMPQ_CALIB_DTYPE`): per model, the seconds of the Fisher pass and of a GPTQ
quantization (whose time is mostly its calibration passes), and the quality of what each gives,
in one run so the times compare as ratios.

    python benchmarks/calib_dtype.py --models smollm2-135m,qwen2.5-coder-0.5b

Quality: GPTQ int4-g128 scored against the original on held-out `wiki` and `c4` windows (the same
windows for both dtypes), and the Fisher weights' relative difference, beside the difference that
sampling other labels makes (the estimate's own noise). Writes
benchmarks/results/calib_dtype/calib_dtype.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq import atomic  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import Reference, evaluate  # noqa: E402
from ampq.fisher import output_fisher  # noqa: E402
from ampq.report import block_linear_names  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "calib_dtype"
DTYPES = ("float32", "bfloat16")


def run_model(name: str, calib_windows: int, eval_windows: int) -> list[dict]:
    original, tok = ampq.load_model(name)
    calib = make_windows(tok, "mix", "calib", 512, calib_windows)
    evals = {t: make_windows(tok, t, "eval", 512, eval_windows) for t in ("wiki", "c4")}
    refs = {t: Reference(original, w) for t, w in evals.items()}
    names = block_linear_names(original)
    rows, fishers = [], {}
    for dtype in DTYPES:
        os.environ["AMPQ_CALIB_DTYPE"] = dtype
        t0 = time.perf_counter()
        fishers[dtype] = output_fisher(original, calib.tokens[:8], names, progress=False)
        t1 = time.perf_counter()
        model = ampq.quantize(copy.deepcopy(original), "int4-g128", algorithm="gptq", calibration=calib, progress=False)
        t2 = time.perf_counter()
        row = {"model": name, "calibration_dtype": dtype, "fisher_s": t1 - t0, "gptq_s": t2 - t1}
        for t, w in evals.items():
            q = evaluate(model, w, refs[t], progress=False).as_dict()
            row[t] = {"perplexity": q["perplexity"], "original": refs[t].quality.perplexity, "kl": q["kl"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    # the estimate's own noise for scale: float32 again with other sampled labels
    os.environ["AMPQ_CALIB_DTYPE"] = "float32"
    other = output_fisher(original, calib.tokens[:8], names, progress=False, seed=1)
    a = fishers["float32"]
    for key, b in (("fisher_bf16_difference", fishers["bfloat16"]), ("fisher_seed_difference", other)):
        d = sorted(float((a[n] - b[n]).norm() / a[n].norm()) for n in names)
        rows[-1][key] = {"median": d[len(d) // 2], "max": d[-1]}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens per text")
    args = p.parse_args()
    forced = os.environ.get("AMPQ_CALIB_DTYPE")
    models = [m.strip() for m in args.models.split(",")]
    rows = [r for m in models for r in run_model(m, args.calib_windows, args.windows)]
    if forced is None:
        os.environ.pop("AMPQ_CALIB_DTYPE", None)
    m = machine()
    for r in rows:
        r["command"], r["calib_windows"], r["eval_windows"] = m["command"], args.calib_windows, args.windows
        r["torch_threads"] = m["torch_threads"]
    # other models' rows from earlier runs stay (each model's two dtypes come from one run)
    out = RESULTS / "calib_dtype.json"
    kept = [r for r in json.loads(out.read_text())["rows"] if r["model"] not in models] if out.exists() else []
    write(kept + rows, m)


def write(rows: list[dict], m: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic.write_text(RESULTS / "calib_dtype.json", json.dumps({"machine": m, "rows": rows}, indent=1))
    lines = [f"On {describe(m)}; calibration `mix` windows of 512 tokens, the "
             "Fisher pass on 8 of them; GPTQ int4-g128 scored on held-out windows of 512 tokens per text; each model's "
             "two rows from one run (its command below).", "",
             "| model | calibration passes | Fisher s | GPTQ s | ppl wiki (original) | KL wiki | ppl c4 (original) | KL c4 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w, c = r["wiki"], r["c4"]
        lines.append(f"| {r['model']} | {r['calibration_dtype']} | {r['fisher_s']:.1f} | {r['gptq_s']:.1f} | "
                     f"{w['perplexity']:.3f} ({w['original']:.3f}) | {w['kl']:.4f} | {c['perplexity']:.3f} "
                     f"({c['original']:.3f}) | {c['kl']:.4f} |")
    lines += ["", "Relative difference of a layer's Fisher weights (median / largest over the linears), bf16 against "
              "float32, and, for scale, float32 with other sampled labels (seed 1 against 0):", ""]
    lines += [f"- {r['model']}: bf16 {r['fisher_bf16_difference']['median']:.3f} / {r['fisher_bf16_difference']['max']:.3f}; "
              f"other labels {r['fisher_seed_difference']['median']:.3f} / {r['fisher_seed_difference']['max']:.3f}; "
              f"{r.get('calib_windows', 32)} calibration windows, {r.get('eval_windows', 8)} evaluation windows per text, "
              f"{r.get('torch_threads', '?')} torch threads, "
              f"`{r.get('command', 'python benchmarks/calib_dtype.py --models ' + r['model'])}`"
              for r in rows if "fisher_bf16_difference" in r]
    atomic.write_text(RESULTS / "calib_dtype.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
