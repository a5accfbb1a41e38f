"""How much dampening GPTQ needs: for every linear of a few decoder blocks, GPTQ's error on held-out
text relative to round to nearest's, at several dampening shares, and with the share chosen per
layer by cross-validation on the calibration text itself.

GPTQ minimizes tr(dW H dW^T) on the calibration Hessian H. Where a layer sees few calibration tokens
per input (a wide down-projection: 8960 inputs against 16,384 tokens on Qwen2.5-1.5B), H is a
noisy estimate and the error feedback fits its noise: the calibration error drops while the error
on other text can rise above round to nearest's. The yardstick here is therefore the error on the
Hessian of held-out text (the `wiki` evaluation windows, which calibration never saw), which tracks
the model's KL (docs/schemes.md). "cv" picks each layer's share by fitting on the even calibration
windows and scoring on the odd ones, then solves on all of them: a rule that needs no held-out text.

    python benchmarks/gptq_damp.py --models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b

Writes benchmarks/results/gptq_damp/gptq_damp.json (rows kept per model) and its Markdown table.
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
from clip_search import block_linears  # noqa: E402

import ampq  # noqa: E402
from ampq.algorithms.gptq import DAMP, gptq  # noqa: E402
from ampq.calibrate import LayerStats, autocast_dtype  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.formats import get_format  # noqa: E402
from ampq.models import fused_groups  # noqa: E402

DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0)
OUT = Path(__file__).parent / "results" / "gptq_damp" / "gptq_damp.json"


def input_owners(names: list[str]) -> dict[str, str]:
    """Each linear -> the first linear of those sharing its input (q/k/v, gate/up): one Hessian each."""
    owner = {n: n for n in names}
    for group in fused_groups(names):
        owner.update({n: group[0] for n in group})
    return owner


def gather(model, owners: dict[str, str], windows: list[torch.Tensor]) -> list[dict[str, LayerStats]]:
    """Input statistics of each owner linear, one set per list of windows, in bf16 passes where
    the processor multiplies bf16 (the statistics themselves are float32)."""
    sets = [{o: LayerStats.empty(model.get_submodule(o).in_features, "cpu") for o in set(owners.values())}
            for _ in windows]
    current: dict[str, LayerStats] = {}
    hooks = [model.get_submodule(o).register_forward_pre_hook(lambda m, a, o=o: current[o].add(a[0]))
             for o in set(owners.values())]
    dtype = autocast_dtype("cpu")
    try:
        for toks, stats in zip(windows, sets):
            current.clear()
            current.update(stats)
            with torch.inference_mode(), torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
                for i in range(0, len(toks), 2):
                    model(toks[i:i + 2], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sets


def joined(a: LayerStats, b: LayerStats) -> LayerStats:
    return LayerStats(a.xtx + b.xtx, a.sum + b.sum, torch.maximum(a.absmax, b.absmax), a.count + b.count)


def error(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    return float(torch.einsum("ij,jk,ik->", dw, hessian, dw))


@torch.inference_mode()
def logprobs(model, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(tokens[i:i + 1], use_cache=False).logits.float(), -1)[0]
                      for i in range(len(tokens))])


@torch.inference_mode()
def kl_with(model, deltas: dict[str, torch.Tensor], tokens: torch.Tensor, ref: torch.Tensor) -> float:
    """KL(original || model with ``deltas`` added to those linears' weights), nats per token."""
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in deltas}
    try:
        for n, d in deltas.items():
            model.get_submodule(n).weight.add_(d.to(originals[n].dtype))
        return float((ref.exp() * (ref - logprobs(model, tokens))).sum(-1).mean())
    finally:
        for n, w in originals.items():
            model.get_submodule(n).weight.copy_(w)


def measure(model_name: str, fmt_name: str, blocks: int, windows: int, damps: tuple[float, ...],
            kl_windows: int = 4) -> dict:
    model, tok = ampq.load_model(model_name)
    names = block_linears(model, blocks)
    owners = input_owners(names)
    calib = make_windows(tok, "mix", "calib", 512, windows).tokens
    held_out = make_windows(tok, "wiki", "eval", 512, 8).tokens
    t0 = time.perf_counter()
    even, odd, ev = gather(model, owners, [calib[0::2], calib[1::2], held_out])
    fmt = get_format(fmt_name)
    per_layer, deltas = {}, {"rtn": {}, "cv": {}, **{str(d): {} for d in damps}}
    for n in names:
        o = owners[n]
        w = model.get_submodule(n).weight.detach().float()
        full, h_eval = joined(even[o], odd[o]), ev[o].hessian
        rtn = error(fmt.fake_quantize(w, 1.0) - w, h_eval)

        def solved(stats, damp):
            codes, params = gptq(w, fmt, stats, 1.0, damp=damp)
            return fmt.dequantize_codes(codes, params.values) - w

        deltas["rtn"][n] = fmt.fake_quantize(w, 1.0) - w
        held = {}
        for d in damps:
            deltas[str(d)][n] = solved(full, d)
            held[d] = error(deltas[str(d)][n], h_eval) / rtn
        fit_even = {d: error(solved(even[o], d), odd[o].hessian) for d in damps}
        cv = min(fit_even, key=fit_even.get)
        deltas["cv"][n] = deltas[str(cv)][n]
        calib_err = error(solved(full, DAMP), full.hessian) / error(fmt.fake_quantize(w, 1.0) - w, full.hessian)
        per_layer[n] = {"held_out_over_rtn": {str(d): v for d, v in held.items()}, "cv_damp": cv,
                        "cv_held_out_over_rtn": held[cv], "calib_over_rtn_at_default": calib_err,
                        "inputs": w.shape[1]}
        print(f"[{model_name}] {n}: " + " ".join(f"{d}:{v:.3f}" for d, v in held.items()) + f" cv {cv}",
              flush=True)
    mean = {str(d): sum(r["held_out_over_rtn"][str(d)] for r in per_layer.values()) / len(names) for d in damps}
    worst = {str(d): max(r["held_out_over_rtn"][str(d)] for r in per_layer.values()) for d in damps}
    cv_mean = sum(r["cv_held_out_over_rtn"] for r in per_layer.values()) / len(names)
    kl = {}
    if kl_windows:
        ref = logprobs(model, held_out[:kl_windows])
        kl = {k: kl_with(model, d, held_out[:kl_windows], ref) for k, d in deltas.items()}
    print(f"[{model_name}] KL with these layers quantized: {kl}", flush=True)
    return {"model": model_name, "format": fmt_name, "layers": names, "calib": "mix", "calib_windows": windows,
            "held_out": "wiki eval, 8 x 512", "seconds": time.perf_counter() - t0, "per_layer": per_layer,
            "mean_held_out_over_rtn": mean, "worst_held_out_over_rtn": worst, "cv_mean_held_out_over_rtn": cv_mean,
            "kl_windows": kl_windows, "kl": kl,
            "tokens": int(calib.numel())}


def markdown(result: dict) -> str:
    rows = result["rows"]
    damps = list(rows[0]["mean_held_out_over_rtn"]) if rows else []
    lines = [f"Machine: {describe(result['machine'])}. GPTQ `{rows[0]['format'] if rows else ''}` on every linear of "
             "a few decoder blocks spread from the first to the last, calibrated on `mix`; cells: the error "
             "tr(dW H dW^T) on the held-out `wiki` evaluation text's Hessian, GPTQ over round to nearest "
             "(below 1: GPTQ helps), the mean over the layers and in brackets the worst layer; `cv`: each "
             "layer's share chosen on the calibration text (fit on its even windows, score on the odd).", "",
             "| model | layers (tokens) | " + " | ".join(f"damp {d}" for d in damps) + " | cv |",
             "|---|---|" + "---|" * (len(damps) + 1)]
    kl_lines = ["", "The KL to the original on held-out `wiki` with all those layers quantized at once "
                "(nats per token; round to nearest, then GPTQ at each share):", "",
                "| model | RTN | " + " | ".join(f"damp {d}" for d in damps) + " | cv |",
                "|---|---|" + "---|" * (len(damps) + 1)]
    for r in rows:
        worst_cv = max(v["cv_held_out_over_rtn"] for v in r["per_layer"].values())
        cells = [f"{r['mean_held_out_over_rtn'][d]:.3f} ({r['worst_held_out_over_rtn'][d]:.2f})" for d in damps]
        lines.append(f"| {r['model']} | {len(r['layers'])} ({r['tokens']}) | " + " | ".join(cells)
                     + f" | {r['cv_mean_held_out_over_rtn']:.3f} ({worst_cv:.2f}) |")
        if r.get("kl"):
            kl_lines.append(f"| {r['model']} | " + " | ".join(f"{r['kl'][k]:.5f}" for k in ["rtn", *damps, "cv"]) + " |")
    return "\n".join(lines + (kl_lines if any(r.get("kl") for r in rows) else [])) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--format", default="int4-g128")
    p.add_argument("--blocks", type=int, default=3, help="decoder blocks measured, spread evenly (default 3)")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--damps", default=",".join(map(str, DAMPS)))
    p.add_argument("--kl-windows", type=int, default=4,
                   help="held-out windows for the KL with all measured layers quantized at once (0: skip)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--table", action="store_true", help="rewrite the Markdown table from --out and stop")
    args = p.parse_args()
    if not args.table:
        damps = tuple(float(d) for d in args.damps.split(","))
        measure_models(args.out, args.models.split(","), lambda m: measure(m, args.format, args.blocks, args.calib_windows, damps, args.kl_windows), markdown)
    else:
        write_table(args.out, markdown)


if __name__ == "__main__":
    main()
