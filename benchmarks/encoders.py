"""A real sentence-embedding encoder (all-MiniLM-L6-v2) quantized uniformly (int8, int4; round to
nearest and GPTQ) and by AMPQ budgets: cosine similarity of each text's embedding to the original's,
nearest-neighbour agreement, bits per weight and bytes.

    python benchmarks/encoders.py [--model all-minilm-l6-v2] [--texts 128] [--budgets 4.5,5,6]

Writes benchmarks/results/encoders/encoders.json and encoders.md (``--render``: the .md again from the .json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq import atomic  # noqa: E402
from ampq.comparison import size_of  # noqa: E402
from ampq.report import print_table  # noqa: E402

UNIFORM = [("rtn", "int8-ch"), ("rtn", "int4-g128"), ("rtn", "int4-g64"),
           ("gptq", "int4-g128"), ("gptq", "int4-g64")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--texts", type=int, default=128, help="pieces of each evaluation text")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--corpus", default="wiki,c4")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-window", type=int, default=512)
    p.add_argument("--budgets", default="4.5,5,6")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "encoders"))
    p.add_argument("--render", action="store_true", help="only rewrite encoders.md from encoders.json")
    args = p.parse_args()
    if args.render:
        out = Path(args.out)
        atomic.write_text(out / "encoders.md", markdown(json.loads((out / "encoders.json").read_text())))
        return
    original, tok = ampq.load_model(args.model)
    calibration = ampq.Text("wiki", args.calib_windows, args.calib_window)
    models, seconds, kinds = {}, {}, {}
    for scheme, fmt in UNIFORM:
        name = fmt if scheme == "rtn" else f"{scheme} {fmt}"
        spec = dataclasses.replace(ampq.get_scheme(scheme), format=fmt)
        t = time.perf_counter()
        models[name] = ampq.quantize(copy.deepcopy(original), spec, calibration=calibration, tokenizer=tok,
                                     progress=False)
        seconds[name], kinds[name] = time.perf_counter() - t, "uniform"
    for bits in [float(b) for b in args.budgets.split(",") if b.strip()]:
        name = f"AMPQ {bits:g} bits"
        t = time.perf_counter()
        models[name] = ampq.quantize(copy.deepcopy(original), ampq.Budget(bits=bits), calibration=calibration,
                                     tokenizer=tok, progress=False)
        seconds[name], kinds[name] = time.perf_counter() - t, "ampq"
    texts = [ampq.Text(c.strip(), args.texts, args.max_tokens) for c in args.corpus.split(",") if c.strip()]
    results = ampq.evaluate(models, original, text=texts, tokenizer=tok, progress=False)
    rows = [{"model": "original (fp32)", "kind": "original", "bits_per_weight": 32.0, "model_bytes": size_of(original)[1],
             "seconds": 0.0, **{r.text: r.reference.as_dict() for r in results}}]
    for name, model in models.items():
        bits, nbytes = size_of(model)
        formats = sorted({m.format_name for m in model.modules() if isinstance(m, ampq.QuantLinear)})
        rows.append({"model": name, "kind": kinds[name], "bits_per_weight": bits, "model_bytes": nbytes,
                     "seconds": seconds[name], "formats": formats, **{r.text: r.models[name].as_dict() for r in results}})
    data = {"machine": machine(), "model": args.model, "texts": results[0].reference.texts,
            "max_tokens": args.max_tokens, "corpora": [r.text for r in results],
            "calibration": {"text": "wiki", "windows": args.calib_windows, "window": args.calib_window}, "rows": rows}
    head, table = columns(data)
    print_table(f"{args.model}: quantized against the original", head, table, describe(data["machine"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "encoders.json", json.dumps(data, indent=1))
    atomic.write_text(out / "encoders.md", markdown(data))


def columns(data: dict) -> tuple[list[str], list[list]]:
    names = data["corpora"]
    head = ["model", "bits/weight", "model MB"] + [f"cosine {n}" for n in names] + [
        "min cosine", "same nearest", "top-10 overlap"]
    table = [[r["model"], r["bits_per_weight"], r["model_bytes"] / 1e6] + [r[n]["cosine"] for n in names]
             + [min(r[n]["cosine_min"] for n in names), sum(r[n]["neighbours"] for n in names) / len(names),
                sum(r[n]["overlap"] for n in names) / len(names)] for r in data["rows"]]
    return head, table


def markdown(data: dict) -> str:
    """The table of a result; quantization seconds stay in the JSON only: on a shared machine under
    other jobs' load they measure the load, not ampq."""
    head, table = columns(data)
    cal = data["calibration"]
    note = (f"{data['model']}: {data['texts']} texts of at most {data['max_tokens']} tokens per corpus "
            f"({', '.join(data['corpora'])}; held-out halves); embeddings mean-pooled over tokens; 'same nearest' and "
            f"'top-10 overlap' averaged over the corpora; calibration {cal['windows']} windows of {cal['window']} "
            f"{cal['text']} tokens (first half); bits/weight over the quantized linears, model MB the whole model "
            "(the float32 word embeddings are most of it)")
    digits = {"bits/weight": 3, "model MB": 2}

    def cell(column: str, v) -> str:
        return f"{v:.{digits.get(column, 4)}f}" if isinstance(v, float) else str(v)

    lines = [f"Measured on {describe(data['machine'])}.", "", note + ".", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(head, row)) + " |" for row in table]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
