"""`ampq bench` on a model unquantized (fp32, bf16) and quantized (round to nearest, int4 and int8), one
process each, and the table with decode speed-ups over the bf16 model.

    python benchmarks/bench.py [--model smollm2-135m] [--formats int4-g64,int8-ch,int4-g64+head]
    python benchmarks/bench.py --llama-cpp int4-g32-sym,int8-g32-sym   # also llama.cpp on the GGUF export
    python benchmarks/bench.py --checkpoint ampq-4.25=DIR   # also a checkpoint quantized beforehand
    python benchmarks/bench.py --table-only      # rebuild the table from the JSON files

A format with ``+head`` quantizes the output head too (``--lm-head``); with ``@lean`` the model runs
with ``AMPQ_KERNELS=lean`` (no repacked weight copies: the memory side of the trade). ``--llama-cpp FMT`` quantizes
with ampq (round to nearest), exports the checkpoint to GGUF (int4-g32-sym is Q4_0, int8-g32-sym
Q8_0, exactly) and times llama.cpp on it (llama-cpp-python, extra ``engines``; batch 1, as many
threads as ampq).

Writes benchmarks/results/bench/bench-MODEL-VARIANT.json (one per run) and bench-MODEL.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench"


def run(model: str, variant: str, args) -> None:
    common = ["--batch", args.batch, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
              str(args.new_tokens), "--repeats", str(args.repeats), "--json",
              str(RESULTS / f"bench-{model}-{variant}.json")]
    if variant in args.checkpoints:  # a checkpoint made elsewhere (an AMPQ plan, say), as it is
        mode = variant.partition("@")[2]
        subprocess.run([sys.executable, "-m", "ampq", "bench", args.checkpoints[variant], *common], check=True,
                       env=dict(os.environ, AMPQ_KERNELS=mode) if mode else None)
        return
    if variant in ("fp32", "bf16"):
        target = [model] + (["--dtype", "bfloat16"] if variant == "bf16" else [])
        subprocess.run([sys.executable, "-m", "ampq", "bench", *target, *common], check=True)
        return
    engine, _, fmt = variant.rpartition(":")
    fmt, _, mode = fmt.partition("@")
    fmt, head = fmt.removesuffix("+head"), fmt.endswith("+head")
    env = dict(os.environ, AMPQ_KERNELS=mode) if mode else None
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "ampq", "quantize", model, "-f", fmt, "-o", f"{tmp}/m"]
                       + (["--lm-head"] if head else []), check=True)
        if engine != "llama.cpp":
            subprocess.run([sys.executable, "-m", "ampq", "bench", f"{tmp}/m", *common], check=True, env=env)
            return
        subprocess.run([sys.executable, "-m", "ampq", "export", f"{tmp}/m", "--to", "gguf", f"{tmp}/m.gguf"], check=True)
        bits = subprocess.run([sys.executable, "-c", "import sys, ampq; from ampq.report import linear_bits; "
                               "print(linear_bits(ampq.load(sys.argv[1])))", f"{tmp}/m"],
                              capture_output=True, text=True, check=True).stdout.split()[-1]
        subprocess.run([sys.executable, str(Path(__file__).with_name("_llama_cpp_bench.py")), f"{tmp}/m.gguf",
                        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                        "--repeats", str(args.repeats), "--json", str(RESULTS / f"bench-{model}-{variant}.json")]
                       + (["--bits-per-weight", str(bits)] if bits else []), check=True)


def table(model: str, variants: list[str]) -> str:
    runs = {v: json.loads((RESULTS / f"bench-{model}-{v}.json").read_text()) for v in variants}
    base = {r["batch"]: r for r in runs["bf16"]["rows"]}
    lines = ["| model | bits/weight (block linears) | batch | prefill tok/s | decode tok/s | decode vs bf16 | p50 ms | "
             "p99 ms | weights GB/s | predicted MB | measured MB |", "|" + "---|" * 11]
    for v, d in runs.items():
        for r in d["rows"]:
            bits = f"{d['bits_per_weight']:.2f}" if d.get("bits_per_weight") else "-"
            lines.append(f"| {model} {v} | {bits} | {r['batch']} | {r['prefill_tokens_per_s']:.0f} | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base[r['batch']]['decode_tokens_per_s']:.2f}x | "
                         f"{r['latency_p50_ms']:.1f} | {r['latency_p99_ms']:.1f} | {r['bandwidth_gb_s']:.2f} | "
                         f"{r['predicted_bytes'] / 1e6:.0f} | {r['measured_bytes'] / 1e6:.0f} |")
    return "\n".join(lines) + "\n"


def record_machine(path: Path) -> None:
    """`ampq bench --json` writes figures only: add the machine and this script's command beside them."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine

    data = json.loads(path.read_text())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine(), **data}, indent=2))
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", default="int4-g64,int8-ch")
    p.add_argument("--batch", default="1,4,16")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--llama-cpp", default="", help="formats to time in llama.cpp too, e.g. int4-g32-sym,int8-g32-sym")
    p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=DIR",
                   help="also time this checkpoint (e.g. an AMPQ plan quantized beforehand), labelled LABEL")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    variants = (["fp32", "bf16"] + args.formats.split(",") + list(args.checkpoints)
                + [f"llama.cpp:{f}" for f in args.llama_cpp.split(",") if f])
    if not args.table_only:
        for v in variants:
            run(args.model, v, args)
            record_machine(RESULTS / f"bench-{args.model}-{v}.json")
    md = table(args.model, variants)
    (RESULTS / f"bench-{args.model}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
