"""Runtime adaptation: one adaptive checkpoint switched across budgets, against the same plans
quantized directly.

    python benchmarks/adapt.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--levels 4:8]

Per model: an adaptive checkpoint (GPTQ base of LOW bits plus residuals; built once, or --checkpoint),
loaded once. Then for budgets from the lowest to the highest stored plan in steps of 0.5 bits per
weight: the time ``ampq.adapt`` takes to switch, bytes of the model predicted and resident memory
measured (the change from the top plan, malloc_trim'd), perplexity and KL on the held-out halves of
wiki and c4; and the same plan quantized directly: each layer at its lowest level is the GPTQ base
(identical to quantizing the model directly to it: tests/test_adapt.py), each layer above it the
format of that level's bit width quantized directly from the original weights (int8-ch for 8 bits,
int{b}-g128 otherwise, round to nearest).

Also the nesting alternative that was not chosen, measured on the whole model: one 8-bit code
(int8-g128) whose top LOW bits form the low-precision code (bit planes, reconstructed at the
centre of each coarse step), against the low format quantized directly.
Writes benchmarks/results/adapt/adapt.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq.pipeline.adaptive import adapt, nested_layers, stored_range  # noqa: E402
from ampq.bench import resident_bytes  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import Reference, evaluate  # noqa: E402
from ampq.formats import get_format  # noqa: E402
from ampq.memory import return_freed_memory as release_memory  # noqa: E402
from ampq.nn import QuantLinear  # noqa: E402
from ampq.report import linear_bits, model_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "adapt"


def direct_format(bits: int) -> str:
    return "int8-ch" if bits == 8 else f"int{bits}-g128"


def direct_model(adapted, original, level_bits: list[int]):
    """The adapted model's plan, quantized directly: lowest-level layers are their GPTQ base, the
    others the direct format of their level's bit width from the original weights."""
    model = copy.deepcopy(adapted)
    for name, layer in nested_layers(model).items():
        parent, _, child = name.rpartition(".")
        if layer.level == 0:
            replacement = layer.base
        else:
            linear = original.get_submodule(name)
            fmt = direct_format(level_bits[layer.level])
            codes, params = get_format(fmt).quantize_codes(linear.weight.detach().float())
            replacement = QuantLinear.from_linear(linear, fmt, codes, params)
        setattr(model.get_submodule(parent), child, replacement)
    return model


def bit_planes(original, low_bits: int):
    """Every block linear as int8-g128 codes whose top ``low_bits`` bits are kept: the bit-plane
    nesting's low level, as float weights."""
    from ampq.report import block_linear_names

    model = copy.deepcopy(original)
    fmt = get_format("int8-g128")
    shift = 8 - low_bits
    for name in block_linear_names(model):
        linear = model.get_submodule(name)
        codes, params = fmt.quantize_codes(linear.weight.detach().float())
        coarse = (codes >> shift << shift) + (1 << (shift - 1))  # centre of each coarse step
        linear.weight.data = fmt.dequantize_codes(coarse, params.values).to(linear.weight.dtype)
    return model


def quality(model, evals, refs) -> dict:
    return {c: evaluate(model, evals[c], refs[c], progress=False).as_dict() for c in evals}


def run_model(name: str, args, info) -> list[dict]:
    from ampq.pipeline.adaptive import quantize_adaptive

    original, tok = ampq.load_model(name)
    levels = [int(b) for b in args.levels.split(":")]
    checkpoint = Path(args.checkpoint or f"/tmp/ampq-bench/{name}-adaptive-{'-'.join(map(str, levels))}-c{args.calib_windows}")
    build_s = None
    if not (checkpoint / "ampq.json").exists():
        calib = make_windows(tok, args.calib, "calib", args.calib_window, args.calib_windows)
        t0 = time.perf_counter()
        model = quantize_adaptive(copy.deepcopy(original), levels, calib, progress=True)
        build_s = time.perf_counter() - t0
        ampq.save(model, checkpoint, tok)
        del model
        gc.collect()
    evals = {c: make_windows(tok, c, "eval", 512, args.windows) for c in args.corpora}
    refs = {c: Reference(original, w) for c, w in evals.items()}
    rows = []
    base = {"model": name, "levels": args.levels, "calib_windows": args.calib_windows, "eval_windows": args.windows,
            "build_s": build_s}

    def add(row):
        rows.append({**base, **row})
        r = rows[-1]
        print(f"[{name}] {r['kind']} {r.get('budget', '')}: {r['bits_per_weight']:.3f} bpw, wiki ppl "
              f"{r['wiki']['perplexity']:.3f}", file=sys.stderr, flush=True)

    for fmt, kind in ((f"int{levels[0]}-g128", "direct rtn (uniform)"), (direct_format(levels[-1]), "direct rtn (uniform)")):
        m = ampq.quantize(copy.deepcopy(original), fmt, progress=False)
        add({"kind": kind, "format": fmt, "bits_per_weight": linear_bits(m), "model_bytes": model_bytes(m),
             **quality(m, evals, refs)})
        del m
    planes = bit_planes(original, levels[0])
    add({"kind": "bit planes of int8-g128 (not chosen)", "format": f"top {levels[0]} bits of int8-g128",
         "bits_per_weight": 8 + 32 / 128, "model_bytes": None, **quality(planes, evals, refs)})
    del planes

    gc.collect()
    release_memory()
    rss0 = resident_bytes()
    t0 = time.perf_counter()
    model = ampq.load(checkpoint)
    load_s = time.perf_counter() - t0
    lo, hi = stored_range(model)
    budgets = [lo + 0.5 * i for i in range(int((hi - lo) / 0.5) + 1)] + [hi]
    adapt(model, hi)
    gc.collect()
    release_memory()
    top_bytes, top_rss = model_bytes(model), resident_bytes()
    down, up = adapt(model, lo), adapt(model, hi)
    for budget in budgets:
        adapt(model, hi)
        gc.collect()
        release_memory()
        before_rss = resident_bytes()
        switch = adapt(model, budget)
        gc.collect()
        release_memory()
        after_rss = resident_bytes()
        direct = direct_model(model, original, levels)
        add({"kind": "adapted", "budget": budget, "bits_per_weight": linear_bits(model),
             "model_bytes": model_bytes(model), "switch_s": switch.seconds, "layers_switched": switch.changed,
             "freed_predicted": top_bytes - model_bytes(model), "freed_measured": before_rss - after_rss,
             "predicted_kl": switch.predicted_damage, **quality(model, evals, refs)})
        add({"kind": "direct", "budget": budget, "bits_per_weight": linear_bits(direct),
             "model_bytes": model_bytes(direct), **quality(direct, evals, refs)})
        del direct
    rows.append({**base, "kind": "switch", "load_s": load_s, "load_rss": top_rss - rss0,
                 "whole_model_down_s": down.seconds, "whole_model_up_s": up.seconds, "layers": down.changed, "lowest_bpw": lo, "highest_bpw": hi,
                 "original": {c: refs[c].quality.as_dict() for c in evals}})
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    md = [f"Measured on {describe(info)}.", ""]
    for m in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == m]
        sw = next((r for r in mine if r["kind"] == "switch"), None)
        if sw:
            md.append(f"**{m}** ({mine[0]['levels']}, {mine[0]['calib_windows']} calibration windows, "
                      f"{mine[0]['eval_windows']} x 512 evaluation tokens per text): whole-model switch "
                      f"{1e3 * sw['whole_model_down_s']:.0f} ms down, {1e3 * sw['whole_model_up_s']:.0f} ms up "
                      f"({sw['layers']} layers); original perplexity wiki {sw['original']['wiki']['perplexity']:.3f}, "
                      f"c4 {sw['original']['c4']['perplexity']:.3f}.")
            md.append("")
        md += ["| kind | budget | bits/weight | model MB | ppl wiki | ppl c4 | KL wiki | vs direct (wiki ppl) "
               "| switch ms | freed MB predicted | freed MB measured |", "|" + "---|" * 11]
        direct = {r["budget"]: r for r in mine if r["kind"] == "direct"}
        for r in mine:
            if r["kind"] == "switch":
                continue
            d = direct.get(r.get("budget")) if r["kind"] == "adapted" else None
            vs = f"{100 * (r['wiki']['perplexity'] / d['wiki']['perplexity'] - 1):+.2f}%" if d else "-"
            cells = [r["kind"] if r["kind"] != "direct rtn (uniform)" else f"uniform {r['format']} (rtn)",
                     f"{r['budget']:.2f}" if r.get("budget") is not None else "-", f"{r['bits_per_weight']:.3f}",
                     f"{r['model_bytes'] / 1e6:.1f}" if r.get("model_bytes") else "-",
                     f"{r['wiki']['perplexity']:.3f}", f"{r['c4']['perplexity']:.3f}", f"{r['wiki']['kl']:.4f}", vs,
                     f"{1e3 * r['switch_s']:.0f}" if "switch_s" in r else "-",
                     f"{r['freed_predicted'] / 1e6:.1f}" if "freed_predicted" in r else "-",
                     f"{r['freed_measured'] / 1e6:.1f}" if "freed_measured" in r else "-"]
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--levels", default="4:8")
    p.add_argument("--checkpoint", default=None, help="reuse this adaptive checkpoint (one model only)")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-window", type=int, default=512)
    p.add_argument("--corpora", default="wiki,c4")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "adapt.json"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    args.corpora = args.corpora.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if args.report_only:
        out.with_suffix(".md").write_text(markdown(previous["rows"], previous["machine"]))
        return
    info = machine()
    rows = [r for r in previous["rows"] if r["model"] not in args.models.split(",")]
    for m in args.models.split(","):
        rows += run_model(m, args, info)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
        os.replace(tmp, out)
    text = markdown(rows, info)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
