"""How long the compiled decoding step takes to capture, and to capture again after a precision switch.

    python benchmarks/compile_switch.py [--model smollm2-135m] [--levels 4:8] [--modes recapture,switchable]

The model's decoder-block linears are made adaptive with round-to-nearest residuals (a base of
int{LOW}-g64 plus one residual per further level, ``ampq.nested.nest`` without calibration: what is
timed here is the capture, not the quality of the levels), compiled with ``ampq.compile``, and
switched with ``NestedLinear.set_level`` on every layer (what ``ampq.adapt`` does layer by layer):
to the base, back to the top, and to the base again. Per event: the seconds from the switch to the
first token's logits (the switch itself, the capture or the guard check, one step) and the decode
step's median after it. A level seen before is served by the step already compiled for it, told
apart by its guards; a new one is traced and compiled. Mode ``switchable`` (``ampq.compile(...,
switchable=True)``) calls each adaptive layer as one opaque op instead, so no switch is captured;
both modes run in the same process, so their step times compare.
Writes benchmarks/results/compile_switch/compile_switch.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq.atomic import atomic_file  # noqa: E402
from ampq.models import replace_module  # noqa: E402
from ampq.nested import NestedLinear, nest, residual_formats  # noqa: E402
from ampq.nn import QuantLinear, quantized_linears  # noqa: E402
from ampq.report import linear_bits  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "compile_switch"


def adaptive_model(name: str, levels: list[int]):
    model, _ = ampq.load_model(name)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    base_format = f"int{levels[0]}-g64"
    ampq.quantize(model, base_format, progress=False)
    formats = residual_formats(levels, base_format)
    for n, layer in list(quantized_linears(model).items()):
        if isinstance(layer, QuantLinear):
            replace_module(model, n, NestedLinear(layer, formats, nest(layer, originals[n], formats)))
    return model


def steps(decoder, token, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        token = decoder.step(token).argmax(-1, keepdim=True)
        out.append(time.perf_counter() - t0)
    return out


def run_mode(model, nested, mode: str, n_steps: int) -> list[dict]:
    top = nested[0].levels - 1
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    decoder = ampq.compile(model, max_len=32 + 4 * (n_steps + 1) + 8, switchable=mode == "switchable")
    rows = []
    for event, level in (("first capture", top), ("switch to the base", 0), ("back to the top", top),
                         ("to the base again", 0)):
        t0 = time.perf_counter()
        for m in nested:
            m.set_level(level)
        switched = time.perf_counter() - t0
        captures = len(decoder.capture_seconds)
        if not rows:
            token = decoder.prefill(prompt).argmax(-1, keepdim=True)
        first = steps(decoder, token, 1)[0]
        rest = steps(decoder, token, n_steps)
        rows.append({"mode": mode, "event": event, "level": level, "bits_per_weight": linear_bits(model),
                     "switch_s": switched, "captured": len(decoder.capture_seconds) > captures,
                     "capture_s": decoder.capture_seconds[-1] if len(decoder.capture_seconds) > captures else None,
                     "first_token_s": switched + first, "step_median_ms": 1e3 * statistics.median(rest)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", default="4:8")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--modes", default="recapture,switchable")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(":")]
    model = adaptive_model(args.model, levels)
    nested = [m for m in model.modules() if isinstance(m, NestedLinear)]
    rows = []
    for mode in args.modes.split(","):
        torch._dynamo.reset()  # each mode captures from nothing
        rows += run_mode(model, nested, mode, args.steps)
    m = {**machine(), "load_average_1min": round(os.getloadavg()[0], 2)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_file(RESULTS / "compile_switch.json") as tmp:
        Path(tmp).write_text(json.dumps({"machine": m, "model": args.model, "levels": levels, "rows": rows,
                                         "command": "python benchmarks/compile_switch.py " + " ".join(sys.argv[1:])},
                                        indent=1))
    lines = [f"{args.model}, levels {args.levels} (RTN residuals), on {describe(m)}, {m['torch_threads']} threads, "
             f"1-minute load average {m['load_average_1min']} at the end.", "",
             "| mode | event | bits/weight | captured again | switch s | capture s | switch to first token s | step ms after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cap = f"{r['capture_s']:.1f}" if r["capture_s"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['event']} | {r['bits_per_weight']:.2f} | {'yes' if r['captured'] else 'no'} | "
                     f"{r['switch_s']:.3f} | {cap} | {r['first_token_s']:.2f} | {r['step_median_ms']:.1f} |")
    with atomic_file(RESULTS / "compile_switch.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
