"""Every number format at its usual settings, round to nearest, on the built-in models.

    python benchmarks/uniform.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--windows 16]

Prints a table per model and writes benchmarks/results/uniform/uniform.json. Perplexity on the held-out
halves of wiki and c4 (windows of 512 tokens, no overlap), KL(original || quantized) and top-1
agreement against the unquantized (dequantized-GGUF, float32) model, bits per weight of the
quantized linears, bytes of the whole model, and quantization time.
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
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import Reference, evaluate  # noqa: E402
from ampq.formats import STANDARD_FORMATS  # noqa: E402
from ampq.report import block_linear_names, linear_bits, model_bytes, print_table  # noqa: E402


def run_model(name: str, formats: list[str], corpora: list[str], windows: int, window: int) -> list[dict]:
    model, tok = ampq.load_model(name)
    names = block_linear_names(model)
    texts = {c: make_windows(tok, c, "eval", window, windows) for c in corpora}
    refs = {c: Reference(model, w) for c, w in texts.items()}
    rows = []
    for fmt in formats:
        print(f"[{name}] {fmt}", file=sys.stderr, flush=True)
        q = copy.deepcopy(model)
        t0 = time.perf_counter()
        ampq.quantize(q, fmt, progress=False)
        seconds = time.perf_counter() - t0
        row = {"model": name, "format": fmt, "bits_per_weight": linear_bits(q), "model_bytes": model_bytes(q),
               "quantize_s": seconds}
        for c, w in texts.items():
            r = evaluate(q, w, refs[c], progress=False)
            row[c] = r.as_dict()
        rows.append(row)
        del q
        gc.collect()
    base = {"model": name, "format": "original (fp32)", "bits_per_weight": linear_bits(model, names),
            "model_bytes": model_bytes(model), "quantize_s": 0.0}
    for c in corpora:
        base[c] = refs[c].quality.as_dict()
    return [base] + rows


def markdown(runs: list[dict], info: dict) -> str:
    """The README's table, made from the JSON so the two can never disagree."""
    lines = [f"Measured on {describe(info)}.", ""]
    for run in runs:
        corpora = run["corpora"]
        lines += [f"**{run['model']}**: {run['windows']} windows of {run['window']} tokens per text "
                  f"(held-out halves), stride {run['window']}.", ""]
        head = ["format", "bits/weight", "model MB"] + [f"ppl {c}" for c in corpora] + ["KL", "top-1", "quantize s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in run["rows"]:
            kl = sum(r[c]["kl"] for c in corpora) / len(corpora)
            top1 = sum(r[c]["top1"] for c in corpora) / len(corpora)
            cells = [r["format"] if r["format"].startswith("original") else f"`{r['format']}`",
                     f"{r['bits_per_weight']:.3f}", f"{r['model_bytes'] / 1e6:.1f}"]
            cells += [f"{r[c]['perplexity']:.3f}" for c in corpora]
            cells += [f"{kl:.4f}", f"{top1:.3f}", f"{r['quantize_s']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _write(path: Path, runs: list[dict], info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": info, "runs": runs}, indent=2))
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(markdown(runs, info))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--formats", default=",".join(STANDARD_FORMATS))
    p.add_argument("--corpora", default="wiki,c4")
    p.add_argument("--windows", type=int, default=16, help="windows of --window tokens per text")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "uniform" / "uniform.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only combine earlier results into --out (and its .md)")
    args = p.parse_args()
    out = Path(args.out)
    if args.merge:
        loaded = [json.loads(Path(f).read_text()) for f in args.merge]
        _write(out, [run for d in loaded for run in d["runs"]], loaded[0]["machine"])
        return
    torch.set_num_threads(os.cpu_count() or 1)
    info = machine()
    corpora = args.corpora.split(",")
    runs = []
    for name in args.models.split(","):
        rows = run_model(name, args.formats.split(","), corpora, args.windows, args.window)
        runs.append({"model": name, "windows": args.windows, "window": args.window, "corpora": corpora, "rows": rows})
        tokens = rows[0][corpora[0]]["tokens"]
        print_table(f"{name}: uniform formats, round to nearest",
                    ["format", "bits/weight", "model MB"] + [f"ppl {c}" for c in corpora] + ["KL", "top-1", "quantize s"],
                    [[r["format"], r["bits_per_weight"], r["model_bytes"] / 1e6]
                     + [r[c]["perplexity"] for c in corpora]
                     + [sum(r[c]["kl"] for c in corpora) / len(corpora),
                        sum(r[c]["top1"] for c in corpora) / len(corpora), r["quantize_s"]] for r in rows],
                    f"{describe(info)}; {tokens} tokens per text, window {args.window}, stride {args.window}")
        _write(out, runs, info)


if __name__ == "__main__":
    main()
