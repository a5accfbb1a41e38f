"""Speed of one mixture-of-experts block on the CPU: tokens/s of a random Mixtral block (router and
experts), transformers' float32 module against ampq's QuantExperts in each format, at a decoding
step (1 token), a short batch and a prefill; a few large experts (Mixtral's shape) and many small
ones (OLMoE's and Qwen3-MoE's).

    python benchmarks/moe_block.py [--hidden 1024] [--shape EXPERTS,INTERMEDIATE,TOP_K ...]
                                   [--tokens 1,16,256] [--formats int4-g128-sym,int8-ch-sym] [--seconds 2]

Writes benchmarks/results/moe_block/moe_block.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq.atomic import atomic_file  # noqa: E402

OUT = Path(__file__).parent / "results" / "moe_block"


def block(hidden: int, experts: int, intermediate: int, top_k: int):
    """A one-block random Mixtral (its MoE module is ``model.layers[0].mlp``)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                           num_local_experts=experts, num_experts_per_tok=top_k)
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval().requires_grad_(False)


def timed(module, x: torch.Tensor, seconds: float) -> float:
    """Median CPU seconds of one call (this process's, one torch thread), over calls repeated for
    about ``seconds`` (after two warm-ups): on a shared machine the wall clock also counts the time
    other processes held the cores."""
    with torch.inference_mode():
        module(x)
        module(x)
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 5:
            t = time.process_time()
            module(x)
            times.append(time.process_time() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--shape", action="append", help="experts,intermediate,top-k (repeatable; default 8,2048,2 and "
                                                     "64,256,8)")
    p.add_argument("--tokens", default="1,16,256")
    p.add_argument("--formats", default="int4-g128-sym,int8-ch-sym")
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    shapes = [tuple(int(v) for v in s.split(",")) for s in (args.shape or ["8,2048,2", "64,256,8"])]
    names = ["float32 (transformers)", *args.formats.split(",")]
    rows, implementation = [], None
    for experts, intermediate, top_k in shapes:
        model = block(args.hidden, experts, intermediate, top_k)
        implementation = getattr(model.config, "_experts_implementation", None)
        variants = {names[0]: model.model.layers[0].mlp}
        for fmt in names[1:]:
            variants[fmt] = ampq.quantize(copy.deepcopy(model), {"*.experts.*": fmt}, progress=False).model.layers[0].mlp
        for n in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(1, n, args.hidden, generator=torch.Generator().manual_seed(n))
            row = {"experts": experts, "intermediate": intermediate, "top_k": top_k, "tokens": n}
            row.update({name: n / timed(module, x, args.seconds) for name, module in variants.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    m = machine()
    what = (f"one random Mixtral MoE block (hidden {args.hidden}, router included); transformers' experts "
            f"implementation: {implementation}")
    result = {"machine": m, "block": what, "rows": rows, "unit": "tokens per CPU second (median call, one thread)"}
    OUT.mkdir(parents=True, exist_ok=True)
    with atomic_file(OUT / "moe_block.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Measured on {describe(m)}; {what}; tokens per second of CPU time (one torch thread, median call; the machine was shared, so CPU time rather than the wall clock), higher is faster.", "",
             "| experts x intermediate, top-k | tokens | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in rows:
        lines.append(f"| {row['experts']} x {row['intermediate']}, top-{row['top_k']} | {row['tokens']} | "
                     + " | ".join(f"{row[n]:,.0f}" for n in names) + " |")
    with atomic_file(OUT / "moe_block.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
