"""`ampq bench` on a model unquantized (fp32, bf16) and quantized (round to nearest, int4 and int8), one
process each, and the table with decode speed-ups over the bf16 model.

    python benchmarks/bench.py [--model smollm2-135m] [--formats int4-g64,int8-ch,int4-g64+head]
    python benchmarks/bench.py --llama-cpp int4-g32-sym,int8-g32-sym   # also llama.cpp on the GGUF export
    python benchmarks/bench.py --checkpoint ampq-4.25=DIR   # also a checkpoint quantized beforehand
    python benchmarks/bench.py --checkpoint compiled:ampq-4.25=DIR   # the same, decoded with ampq.compile
    python benchmarks/bench.py --table-only      # rebuild the table from the JSON files
    python benchmarks/bench.py --batch 1 --formats fp32,compiled:int4-g32-sym,int4-g32-sym,compiled:int8-ch-sym,int8-ch-sym \
        --llama-cpp int4-g32-sym,int8-g32-sym --threads 1 --name smollm2-135m-compiled   # ampq.compile against llama.cpp

A format written ``compiled:FMT`` decodes with ``ampq bench --compile`` (``ampq.compile``: a static KV
cache and the step compiled; the capture time is in the JSON). A format with ``+head`` quantizes the output head too (``--lm-head``); with ``@lean`` the model runs
with ``AMPQ_KERNELS=lean`` (no repacked weight copies: the memory side of the trade). ``--llama-cpp FMT`` quantizes
with ampq (round to nearest), exports the checkpoint to GGUF (int4-g32-sym is Q4_0, int8-g32-sym
Q8_0, exactly) and times llama.cpp on it (llama-cpp-python, extra ``engines``; batch 1, as many
threads as ampq).

Writes benchmarks/results/bench/bench-NAME-VARIANT.json (one per run) and bench-NAME.md (NAME: --name, default the
model), each JSON with the machine and its 1-minute load average before and after the run (the cores may be shared).
The table's "vs llama.cpp" column divides a batch-1 row's decode speed by llama.cpp's at the same integer width
(int4 by Q4_0's row, int8 by Q8_0's) in the same run.
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
              str(RESULTS / f"bench-{args.name}-{variant}.json")]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if variant in args.checkpoints:  # a checkpoint made elsewhere (an AMPQ plan, say), as it is
        mode = variant.partition("@")[2]
        compiled = ["--compile"] if variant.startswith("compiled:") else []
        subprocess.run([sys.executable, "-m", "ampq", "bench", args.checkpoints[variant], *common, *compiled],
                       check=True, env=dict(os.environ, AMPQ_KERNELS=mode) if mode else None)
        return
    if variant in ("fp32", "bf16"):
        target = [model] + (["--dtype", "bfloat16"] if variant == "bf16" else [])
        subprocess.run([sys.executable, "-m", "ampq", "bench", *target, *common], check=True)
        return
    engine, _, fmt = variant.rpartition(":")
    if engine == "compiled":
        common.append("--compile")
    fmt, _, mode = fmt.partition("@")
    fmt, head = fmt.removesuffix("+head"), fmt.endswith("+head")
    env = dict(os.environ, AMPQ_KERNELS=mode) if mode else None
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "ampq", "quantize", model, "-f", fmt, "-o", f"{tmp}/m"]
                       + (["--lm-head"] if head else []), check=True)
        if engine in ("", "compiled"):
            subprocess.run([sys.executable, "-m", "ampq", "bench", f"{tmp}/m", *common], check=True, env=env)
            return
        subprocess.run([sys.executable, "-m", "ampq", "export", f"{tmp}/m", "--to", "gguf", f"{tmp}/m.gguf"], check=True)
        bits = subprocess.run([sys.executable, "-c", "import sys, ampq; from ampq.report import linear_bits; "
                               "print(linear_bits(ampq.load(sys.argv[1])))", f"{tmp}/m"],
                              capture_output=True, text=True, check=True).stdout.split()[-1]
        subprocess.run([sys.executable, str(Path(__file__).with_name("_llama_cpp_bench.py")), f"{tmp}/m.gguf",
                        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                        "--repeats", str(args.repeats), "--json", str(RESULTS / f"bench-{args.name}-{variant}.json")]
                       + (["--bits-per-weight", str(bits)] if bits else [])
                       + (["--threads", str(args.threads)] if args.threads else [])
                       + (["--prefill-by-token"] if args.llama_prefill_by_token else []), check=True)


def _width(variant: str) -> str:
    """"int4" for int4-g32-sym, compiled:int4-g64, llama.cpp:int4-g32-sym ..."""
    return variant.rpartition(":")[2].split("-")[0]


def table(name: str, model: str, variants: list[str]) -> str:
    runs = {v: json.loads((RESULTS / f"bench-{name}-{v}.json").read_text()) for v in variants}
    base = {r["batch"]: r for r in runs["bf16"]["rows"]} if "bf16" in runs else None
    llama = {_width(v): d["rows"][0] for v, d in runs.items() if v.startswith("llama.cpp:")}
    cols = ["model", "bits/weight (block linears)", "batch", "prefill tok/s", "decode tok/s"]
    cols += ["decode vs bf16"] if base else []
    cols += ["vs llama.cpp"] if llama else []
    cols += ["p50 ms", "p99 ms", "weights GB/s", "predicted MB", "measured MB"]
    cols += ["compile s"] if any(v.startswith("compiled:") for v in variants) else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for v, d in runs.items():
        for r in d["rows"]:
            bits = f"{d['bits_per_weight']:.2f}" if d.get("bits_per_weight") else "-"
            cells = [f"{model} {v}", bits, str(r["batch"]), f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}"]
            if base:
                cells.append(f"{r['decode_tokens_per_s'] / base[r['batch']]['decode_tokens_per_s']:.2f}x")
            if llama:
                ref = llama.get(_width(v)) if r["batch"] == 1 else None
                cells.append(f"{r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.2f}x" if ref else "-")
            cells += [f"{r['latency_p50_ms']:.1f}", f"{r['latency_p99_ms']:.1f}", f"{r['bandwidth_gb_s']:.2f}",
                      f"{r['predicted_bytes'] / 1e6:.0f}", f"{r['measured_bytes'] / 1e6:.0f}"]
            if "compile s" in cols:
                cells.append(f"{r['compile_seconds']:.0f}" if r.get("compile_seconds") else "-")
            lines.append("| " + " | ".join(cells) + " |")
    loads = {v: d["machine"]["load_average_1min"] for v, d in runs.items() if "load_average_1min" in d.get("machine", {})}
    if loads:  # the cores may be shared: say how busy they were around each run
        threads = sorted({d.get("threads") for d in runs.values()} - {None})
        note = (f"{' / '.join(map(str, threads))} threads; 1-minute load average before / after each run: "
                + ", ".join(f"{v} {a:.1f} / {b:.1f}" for v, (a, b) in loads.items()) + ".")
        return note + "\n\n" + "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n"


def record_machine(path: Path, load_before: float) -> None:
    """`ampq bench --json` writes figures only: add the machine, this script's command and the load
    around the run beside them."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine

    data = json.loads(path.read_text())
    tmp = path.with_suffix(".tmp")
    load = {"load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    tmp.write_text(json.dumps({"machine": {**machine(), **load}, **data}, indent=2))
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
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every engine (default: torch's and llama.cpp's, one per core); on shared "
                        "cores, 1 keeps a busy neighbour from stalling every parallel region")
    p.add_argument("--llama-prefill-by-token", action="store_true",
                   help="llama.cpp takes the prompt one token at a time (a build that crashes on batches)")
    p.add_argument("--only", default=None, help="run only these variants (comma-separated); the table shows all")
    p.add_argument("--name", default=None, help="names the result files (default: the model's name)")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    args.checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    args.name = args.name or args.model
    # fp32 and bf16 unless --formats names them itself
    base = [v for v in ("fp32", "bf16") if v not in args.formats.split(",")] if args.name == args.model else []
    variants = (base + args.formats.split(",") + list(args.checkpoints)
                + [f"llama.cpp:{f}" for f in args.llama_cpp.split(",") if f])
    if args.threads:  # inductor's compiled loops and OpenMP read it too
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if not args.table_only:
        for v in variants:
            if args.only and v not in args.only.split(","):
                continue
            load = os.getloadavg()[0]
            run(args.model, v, args)
            record_machine(RESULTS / f"bench-{args.name}-{v}.json", load)
    md = table(args.name, args.model, variants)
    (RESULTS / f"bench-{args.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
