"""AMPQ against every uniform scheme, on several models and two texts, with one calibration for all:
the benchmark the defaults of AMPQ are decided by.

    python benchmarks/quality.py --models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b \
        --budgets 4.25 --variants all --uniform all

Each AMPQ variant is a candidate set, a transform applied before sensitivity is measured (`awq`:
AWQ's rescaling, shared by every candidate) and a calibration text. Every row (AMPQ or uniform) is
calibrated on the same windows of `--calib` (default: the `mix` of wiki, code, technical and
multilingual text) and scored on the held-out halves of `--texts` (default wiki and c4; c4 is not
in the mix, so it checks a domain calibration never saw). Rows are appended to the JSON as they are
measured (a rerun skips rows already there), with the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import resource
import sys
import time
from pathlib import Path
from collections.abc import Iterator

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine  # noqa: E402

import ampq  # noqa: E402
from ampq import atomic  # noqa: E402
from ampq.algorithms.gptq import DAMP  # noqa: E402
from ampq.pipeline import planner  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import Reference, evaluate  # noqa: E402
from ampq.report import block_linear_names, linear_bits, model_bytes  # noqa: E402
from ampq.sensitivity import DEFAULT_CANDIDATES, SensitivityTable, measure  # noqa: E402
from ampq.pipeline.transform import apply_transform  # noqa: E402
from ampq.resume import Resume  # noqa: E402

OUT = Path(__file__).parent / "results" / "quality" / "quality.json"

# the candidate set of ampq 0.1: min-and-scale integer layouts, NF4, FP8, asymmetric int8
V01 = ["int2-g64:gptq", "int3-g128:gptq", "int3-g64:gptq", "int4-g128:gptq", "int4-g64:gptq", "int4-g32:gptq",
       "nf4-b64-dq:gptq", "int5-g128:gptq", "int6-g128:gptq", "fp8-e4m3-ch:rtn", "int8-ch:rtn", "bf16"]
# layouts with an exact zero (symmetric, or an integer zero point), as vLLM and llama.cpp store them
ZERO = ["int2-g64-zp:gptq", "int3-g128-zp:gptq", "int3-g64-zp:gptq", "int4-g128-zp:gptq", "int4-g128-sym:gptq",
        "int4-g64-zp:gptq", "int4-g32-sym:gptq", "nf4-b64-dq:gptq", "int5-g128-zp:gptq", "int6-g128-sym:gptq",
        "fp8-e4m3-ch:rtn", "int8-ch-sym:rtn", "bf16"]
BOTH = sorted(set(V01) | set(ZERO), key=(V01 + ZERO).index)
NO2 = [c for c in BOTH if not c.startswith("int2")]
DEFAULT = list(DEFAULT_CANDIDATES)  # what --budget uses: the layouts the plans of `both` chose, int2 aside
# the default set with clip search before GPTQ on the 3- and 4-bit candidates, where
# benchmarks/clip_search.py found it lowers the layer error (not at 5 and 6 bits, where it can raise it)
CLIPPED = [c + "+clip" if c.endswith(":gptq") and c.startswith(("int3", "int4", "nf4")) else c for c in DEFAULT]

VARIANTS = {
    "v0.1": {"candidates": V01, "transform": "none", "calib": "wiki"},
    "v0.1+mix": {"candidates": V01, "transform": "none"},
    "both": {"candidates": BOTH, "transform": "none"},
    "both-no-int2": {"candidates": NO2, "transform": "none"},
    "default": {"candidates": DEFAULT, "transform": "none"},
    "default+clip": {"candidates": CLIPPED, "transform": "none"},
    "awq": {"candidates": V01, "transform": "awq"},
    "awq+zero": {"candidates": ZERO, "transform": "awq"},
    "awq+both": {"candidates": BOTH, "transform": "awq"},
    "awq+both-no-int2": {"candidates": NO2, "transform": "awq"},
}
# uniform schemes: (format, algorithm, quantize() options)
UNIFORM = {
    "rtn int4-g128": ("int4-g128", "rtn", {}),
    "gptq int4-g128": ("int4-g128", "gptq", {}),
    "gptq int4-g128-zp": ("int4-g128-zp", "gptq", {}),
    "gptq int4-g128-sym": ("int4-g128-sym", "gptq", {}),
    "awq int4-g128": ("int4-g128", "rtn", {"awq": True, "clip": True}),
    "awq int4-g128-zp": ("int4-g128-zp", "rtn", {"awq": True, "clip": True}),
    "awq+gptq int4-g128": ("int4-g128", "gptq", {"awq": True}),
    "nf4-b64-dq": ("nf4-b64-dq", "rtn", {}),
    "gptq int3-g128": ("int3-g128", "gptq", {}),
    "gptq int5-g128": ("int5-g128", "gptq", {}),
    "int8-ch-sym": ("int8-ch-sym", "rtn", {}),
    "int8-ch": ("int8-ch", "rtn", {}),
}


OLD_DAMP = 0.01  # GPTQ's dampening in rows made before the key was recorded


def gptq_damp(row: dict) -> float | None:
    """The dampening a row's GPTQ ran with; None for a row without GPTQ (AMPQ's candidates are GPTQ)."""
    if row["kind"] != "ampq" and "gptq" not in row.get("algorithm", ""):
        return None
    return row.get("gptq_damp", OLD_DAMP)


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def save_rows(path: Path, rows: list[dict], command: str, note: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"note": note} if note else {}
    atomic.write_text(path, json.dumps({"machine": machine(), "command": command, **extra, "rows": rows}, indent=1))


class Scorer:
    """The original's log-probabilities on each text, computed once per model."""

    def __init__(self, model, tok, texts: list[str], windows: int):
        self.evals = {t: make_windows(tok, t, "eval", 512, windows) for t in texts}
        self.refs = {t: Reference(model, w) for t, w in self.evals.items()}

    def score(self, model) -> dict:
        out = {}
        for t, w in self.evals.items():
            q = evaluate(model, w, self.refs[t], progress=False).as_dict()
            out[t] = {"perplexity": q["perplexity"], "kl": q["kl"], "top1": q["top1"], "tokens": q["tokens"]}
            out[f"{t}_original"] = self.refs[t].quality.perplexity
        return out


def run_ampq(original, tok, calib, variant: str, budgets: list[float], scorer: Scorer, args,
             model_name: str) -> Iterator[dict]:
    spec = VARIANTS[variant]
    # sensitivity leaves the model as it was: only a transform needs a copy of its own
    model = copy.deepcopy(original) if spec["transform"] != "none" else original
    names = block_linear_names(model)
    fixed = planner.fixed_bytes(model, names)
    t0 = time.perf_counter()
    transform = apply_transform(model, spec["transform"], calib, progress=False)
    t1 = time.perf_counter()
    # a run killed during the measurement (hours for a 1.5B model on 2 cores) resumes from the last block
    key = {"model": model_name, "variant": variant, "candidates": spec["candidates"], "transform": spec["transform"],
           "calibration": hashlib.sha256(getattr(calib, "tokens", calib).numpy().tobytes()).hexdigest()}
    # and one killed while quantizing keeps the table: each budget's row is saved as it is done, the
    # table beside them, so a rerun measures nothing twice
    stem = Path(args.out).parent / f".{Path(args.out).stem}-{model_name}-{variant}"
    saved = stem.with_name(stem.name + f"-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
                           ".sensitivity.json")
    if saved.exists():
        table = SensitivityTable.load(saved)
    else:
        resume = Resume(stem.with_name(stem.name + ".ampq-resume"), key)
        table = measure(model, calib, spec["candidates"], progress=False, resume=resume)
        table.save(saved)
        resume.finish()
    t2 = time.perf_counter()
    for k, budget in enumerate(budgets):
        plan = planner.plan_for_budget(table, bits_per_weight=budget, fixed=fixed)
        # the last budget quantizes the transformed copy itself: one float copy fewer at the peak
        quantized = copy.deepcopy(model) if k < len(budgets) - 1 or model is original else model
        t3 = time.perf_counter()
        ampq.quantize(quantized, plan, calibration=calib, progress=False)
        row = {"kind": "ampq", "name": f"AMPQ {variant}", "variant": variant, "budget": budget,
                     "candidates": spec["candidates"], "transform": spec["transform"],
                     "bits_per_weight": linear_bits(quantized), "model_bytes": model_bytes(quantized),
                     "predicted_kl": sum(p.damage for p in plan.layers.values()),
                     "formats": planner.describe(plan),
                     "seconds": {"transform": t1 - t0, "sensitivity": t2 - t1,
                                 "quantize": time.perf_counter() - t3},
                     **scorer.score(quantized)}
        del quantized
        yield row  # the caller saves it before the next budget is quantized


def run_uniform(original, calib, name: str, scorer: Scorer) -> dict:
    fmt, algorithm, options = UNIFORM[name]
    model = copy.deepcopy(original)
    t0 = time.perf_counter()
    ampq.quantize(model, fmt, algorithm=algorithm, calibration=calib, progress=False, **options)
    return {"kind": "uniform", "name": name, "format": fmt, "algorithm": algorithm, "options": options,
            "bits_per_weight": linear_bits(model), "model_bytes": model_bytes(model),
            "seconds": {"quantize": time.perf_counter() - t0}, **scorer.score(model)}


def merge(out: Path, files: list[Path], note: str | None) -> None:
    data = [json.loads(f.read_text()) for f in files]
    rows = load_rows(out)
    def key(r):
        return r["model"], r["name"], r.get("budget"), r["calib"], r["eval_windows"], gptq_damp(r)
    keys = {key(r) for r in rows}
    for d in data:
        rows += [r for r in d["rows"] if key(r) not in keys]
    # the commands that made the rows already there are kept, each once
    before = json.loads(out.read_text()).get("command", "") if out.exists() else ""
    commands = [c for c in before.split(" ; ") if c] + [d["command"] for d in data]
    note = note or (json.loads(out.read_text()).get("note") if out.exists() else None)
    save_rows(out, rows, " ; ".join(dict.fromkeys(commands)), note)
    print(f"{len(rows)} rows in {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--budgets", default="4.25")
    p.add_argument("--variants", default="all", help=f"comma-separated, or all: {', '.join(VARIANTS)}")
    p.add_argument("--uniform", default="all", help=f"comma-separated, none, or all: {', '.join(UNIFORM)}")
    p.add_argument("--calib", default="mix")
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--texts", default="wiki,c4")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens per text")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                   help="fold the rows of these result files (runs made side by side, each with its own --out) into "
                   "--out, with their commands, and stop")
    p.add_argument("--note", default=None, help="with --merge: how the runs were made (kept in the result)")
    args = p.parse_args()
    if args.merge:
        merge(Path(args.out), [Path(f) for f in args.merge], args.note)
        return
    budgets = [float(b) for b in args.budgets.split(",")]
    variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v and v != "none"]
    unknown = [v for v in variants if v not in VARIANTS] + [u for u in (args.uniform.split(",")) if u not in UNIFORM
                                                            and u not in ("all", "none", "")]
    if unknown:
        p.error(f"unknown variant or scheme: {', '.join(unknown)}")
    uniform = list(UNIFORM) if args.uniform == "all" else [u for u in args.uniform.split(",") if u and u != "none"]
    out = Path(args.out)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    rows = load_rows(out)

    def have(model_name, **key):
        return any(r["model"] == model_name and r["calib"] == args.calib and r["eval_windows"] == args.windows
                   and gptq_damp(r) in (None, DAMP) and all(r.get(k) == v for k, v in key.items()) for r in rows)

    for model_name in args.models.split(","):
        original, tok = ampq.load_model(model_name)
        scorer = Scorer(original, tok, args.texts.split(","), args.windows)
        # GPTQ's dampening and the calibration passes' dtype: rows made before either changed stay
        # in the table beside the new ones (rows without the keys: 1% and float32)
        common = {"model": model_name, "calib": args.calib, "calib_windows": args.calib_windows,
                  "eval_windows": args.windows, "gptq_damp": DAMP, "calibration_dtype": machine()["calibration_dtype"]}
        calibs = {}

        def calibration(text):
            if text not in calibs:
                calibs[text] = make_windows(tok, text, "calib", 512, args.calib_windows)
            return calibs[text]

        for name in uniform:
            if have(model_name, name=name):
                continue
            row = {**common, **run_uniform(original, calibration(args.calib), name, scorer)}
            rows.append(row)
            save_rows(out, rows, command)
            print(f"[{model_name}] {name}: {row['bits_per_weight']:.3f} bpw, " + ", ".join(
                f"{t} ppl {row[t]['perplexity']:.3f} KL {row[t]['kl']:.4f}" for t in scorer.evals), flush=True)
        for variant in variants:
            todo = [b for b in budgets if not have(model_name, variant=variant, budget=b)]
            if not todo:
                continue
            calib_text = VARIANTS[variant].get("calib", args.calib)
            for row in run_ampq(original, tok, calibration(calib_text), variant, todo, scorer, args, model_name):
                row = {**common, **row, "calib_used": calib_text}
                rows.append(row)
                save_rows(out, rows, command)
                print(f"[{model_name}] AMPQ {variant} @ {row['budget']}: {row['bits_per_weight']:.3f} bpw, " + ", ".join(
                    f"{t} ppl {row[t]['perplexity']:.3f} KL {row[t]['kl']:.4f}" for t in scorer.evals)
                    + f", predicted KL {row['predicted_kl']:.4f}, {row['formats']}", flush=True)
        del original
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB; rows in {out}")


if __name__ == "__main__":
    main()
