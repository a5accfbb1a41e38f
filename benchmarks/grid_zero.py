"""Does a grid with an exact zero matter? GPTQ and round to nearest, int4-g128 (fp16 scale + fp16 minimum,
GGUF Q4_1's layout) against int4-g128-zp (fp16 scale + integer zero point, GPTQ/AWQ/compressed-tensors'
layout), on the same calibration Hessian of chosen linears; error = tr(dW H dW^T).

    python benchmarks/grid_zero.py [--model qwen2.5-coder-0.5b] [--layers model.layers.16.self_attn.v_proj,...]

Writes benchmarks/results/grid_zero/grid_zero.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq.algorithms.gptq import gptq  # noqa: E402
from ampq.calibrate import LayerStats  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.formats import get_format  # noqa: E402
from ampq.report import print_table  # noqa: E402

FORMATS = ("int4-g128", "int4-g128-zp")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--layers", default=",".join(f"model.layers.{i}.self_attn.v_proj" for i in (4, 16, 17, 21)))
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "grid_zero" / "grid_zero.json"))
    args = p.parse_args()
    model, tok = ampq.load_model(args.model)
    names = args.layers.split(",")
    stats, hooks = {}, []
    for n in names:
        linear = model.get_submodule(n)
        stats[n] = LayerStats.empty(linear.in_features, "cpu")
        hooks.append(linear.register_forward_pre_hook(lambda m, a, n=n: stats[n].add(a[0])))
    tokens = make_windows(tok, "wiki", "calib", 512, args.calib_windows).tokens
    with torch.inference_mode():
        for i in range(0, len(tokens), 8):
            model(tokens[i:i + 8], use_cache=False)
    for h in hooks:
        h.remove()
    rows = []
    for n in names:
        w, h = model.get_submodule(n).weight.detach().float(), stats[n].hessian
        row = {"layer": n}
        for name in FORMATS:
            fmt = get_format(name)
            codes, params = gptq(w, fmt, stats[n])
            for label, q in (("gptq", fmt.dequantize_codes(codes, params.values)), ("rtn", fmt.fake_quantize(w))):
                dw = q - w
                row[f"{label} {name}"] = float(torch.einsum("ij,jk,ik->", dw, h, dw))
        rows.append(row)
    head = ["layer"] + [f"{a} {f}" for f in FORMATS for a in ("gptq", "rtn")]
    info = machine()
    print_table(f"{args.model}: tr(dW H dW^T) on the same Hessian", head, [[r[k] for k in head] for r in rows], describe(info))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": info, "model": args.model, "calib_windows": args.calib_windows, "rows": rows}, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
