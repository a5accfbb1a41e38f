"""Does clip search help the AMPQ candidates? For each candidate format, GPTQ and round to nearest
with and without clip search (``+clip``: per group, the range ratio of least activation-weighted
error, `ampq.algorithms.clip`), on the same calibration Hessians of every linear in a few blocks;
error = tr(dW H dW^T), summed over the layers, and the ratio clip / no clip.

    python benchmarks/clip_search.py --models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b

A ratio below 1 means clip search lowers the layer-level error the allocation compares; whether a
candidate with it should be a default is then decided end to end by benchmarks/quality.py.
Writes benchmarks/results/clip_search/clip_search.json (rows appended per model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402
from _rows import measure_models, write_table  # noqa: E402

import ampq  # noqa: E402
from ampq.algorithms.clip import search_clip  # noqa: E402
from ampq.algorithms.gptq import gptq  # noqa: E402
from ampq.calibrate import LayerStats  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.formats import get_format  # noqa: E402
from ampq.models import decoder_blocks  # noqa: E402

FORMATS = ("int3-g128", "int3-g128-zp", "int4-g128", "int4-g32", "nf4-b64-dq", "int5-g128-zp", "int6-g128-sym")
OUT = Path(__file__).parent / "results" / "clip_search" / "clip_search.json"


def block_linears(model, blocks: int) -> list[str]:
    """Every linear of ``blocks`` decoder blocks spread evenly from the first to the last."""
    mods = decoder_blocks(model)
    picks = sorted({round(i * (len(mods) - 1) / max(blocks - 1, 1)) for i in range(blocks)})
    return [f"{mods[i][0]}.{n}" for i in picks for n, m in mods[i][1].named_modules() if isinstance(m, torch.nn.Linear)]


def measure(model_name: str, formats: list[str], blocks: int, windows: int) -> dict:
    model, tok = ampq.load_model(model_name)
    names = block_linears(model, blocks)
    stats, hooks = {}, []
    for n in names:
        linear = model.get_submodule(n)
        stats[n] = LayerStats.empty(linear.in_features, "cpu")
        hooks.append(linear.register_forward_pre_hook(lambda m, a, n=n: stats[n].add(a[0])))
    tokens = make_windows(tok, "mix", "calib", 512, windows).tokens
    with torch.inference_mode():
        for i in range(0, len(tokens), 4):
            model(tokens[i:i + 4], use_cache=False)
    for h in hooks:
        h.remove()
    keys = [f"{a}{c} {f}" for f in formats for a in ("gptq", "rtn") for c in ("", "+clip")]
    per_layer = {n: {} for n in names}
    t0 = time.perf_counter()
    for n in names:
        w, s = model.get_submodule(n).weight.detach().float(), stats[n]
        h = s.hessian
        for name in formats:
            fmt = get_format(name)
            try:
                ratios = search_clip(w, fmt, s)
            except ValueError:  # a width the format cannot group
                continue
            for clip, r in (("", 1.0), ("+clip", ratios)):
                codes, params = gptq(w, fmt, s, r)
                for algo, q in (("gptq", fmt.dequantize_codes(codes, params.values)), ("rtn", fmt.fake_quantize(w, r))):
                    dw = q - w
                    per_layer[n][f"{algo}{clip} {name}"] = float(torch.einsum("ij,jk,ik->", dw, h, dw))
        print(f"[{model_name}] {n} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    errors = {k: sum(e.get(k, 0.0) for e in per_layer.values()) for k in keys}
    ratio, better = {}, {}
    for f in formats:
        for a in ("gptq", "rtn"):
            plain, clipped = f"{a} {f}", f"{a}+clip {f}"
            ratio[plain] = errors[clipped] / errors[plain] if errors[plain] else None
            # the layer-by-layer choice of the two (what a plan holding both as candidates could take)
            best = sum(min(e[plain], e[clipped]) for e in per_layer.values() if plain in e)
            ratio[f"{a} best-of {f}"] = best / errors[plain] if errors[plain] else None
            better[plain] = sum(e[clipped] < e[plain] for e in per_layer.values() if plain in e)
    return {"model": model_name, "layers": names, "calib": "mix", "calib_windows": windows,
            "errors": errors, "per_layer": per_layer, "clip_over_plain": ratio, "layers_clip_better": better}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--blocks", type=int, default=3, help="decoder blocks measured, spread evenly (default 3)")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--table", action="store_true", help="rewrite the Markdown table from --out and stop")
    args = p.parse_args()
    if not args.table:
        formats = args.formats.split(",")
        measure_models(args.out, args.models.split(","), lambda m: measure(m, formats, args.blocks, args.calib_windows), markdown)
    else:
        write_table(args.out, markdown)


def markdown(result: dict) -> str:
    """Per model and format, the error with clip search over the error without it, for GPTQ and for
    round to nearest, and in how many of the measured layers clip search lowered GPTQ's error."""
    rows = result["rows"]
    formats = list(dict.fromkeys(k.split(" ", 1)[1] for r in rows for k in r["clip_over_plain"]
                                 if not k.startswith(("gptq best-of", "rtn best-of"))))
    blocks = sorted({len({n.rsplit(".", 2)[0] for n in r["layers"] if "." in n}) for r in rows})
    lines = [f"Machine: {describe(result['machine'])}. Calibration `mix`, the linears of "
             f"{' or '.join(map(str, blocks))} decoder blocks spread from the first to the last; error tr(dW H dW^T) on each layer's calibration Hessian, summed over "
             "the layers. Cells: error with clip search / without (below 1: clip search helps), and for GPTQ "
             "the layers where it helped; - where the format holds the weights exactly (no error to lower: "
             "SmolLM2's Q4_1 source grid in `int4-g32`).", "",
             "| format | " + " | ".join(f"{r['model']} GPTQ | {r['model']} RTN" for r in rows) + " |",
             "|---|" + "---|---|" * len(rows)]
    for f in formats:
        cells = []
        for r in rows:
            g, n = r["clip_over_plain"].get(f"gptq {f}"), r.get("layers_clip_better", {}).get(f"gptq {f}")
            rtn = r["clip_over_plain"].get(f"rtn {f}")
            total = len(r["layers"])
            cells.append("-" if g is None else f"{g:.3f}" + (f" ({n}/{total})" if n is not None else ""))
            cells.append("-" if rtn is None else f"{rtn:.3f}")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
