"""Quantized matmul kernels against dense matmul at Llama-3-8B shapes, and the floor that memory
bandwidth sets.

    python benchmarks/kernels.py [--shapes 4096x4096,4096x14336,14336x4096] [--m 1,16,128,1024]
    python benchmarks/kernels.py --gpu      # on a CUDA machine: check every kernel, then time it

GPU (``--gpu``, in ``_kernels_gpu.py``): every GPU kernel checked against the reference on the
device (failures reported at the end, exit status 1), then kernel time only as ANCHORS.md's
figures were taken (a CUDA graph, median of 100 replays), with weight copies rotated past the L2
cache, against fp16 cuBLAS and torch's int4 kernel; FP8 W8A8 against ``torch._scaled_mm`` alone.
Writes kernels-gpu.json and .md to $OUT (the device tool's folder) or benchmarks/results/kernels.

CPU: ampq's dispatch (`auto`: torch's packed int4 kernel for int2-4 up to 128 rows and int8 per
channel up to 64; the other formats with a lookup form (NF4/FP4, FP8, grouped int8) as three int4
planes in that kernel up to 16 rows; beyond, the slab kernel, which decodes a slab of rows at a
time; else the reference), the reference kernel alone, torch's dense fp32 and bf16 matmuls. The floor is the bytes a kernel must
read (weights as stored, plus activations) over the copy bandwidth measured on this machine in the
same run. Times are medians of repeated calls after a warm-up; ratios are to dense fp32 and bf16
measured in the same run. Writes benchmarks/results/kernels/kernels.json and .md.
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

from ampq import kernels  # noqa: E402
from ampq.nn import QuantLinear  # noqa: E402
from ampq.formats import get_format  # noqa: E402
from ampq.kernels.cpu_slab import slab_linear  # noqa: E402
from ampq.kernels.cpu_slab import supports as slab_supports  # noqa: E402
from ampq.report import print_table  # noqa: E402


def timed(fn, min_time: float = 0.3, max_calls: int = 50) -> float:
    fn()  # warm-up: packing, allocator
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src))
    return 2 * nbytes / seconds  # read + write


def layer_for(fmt: str, n: int, k: int) -> QuantLinear:
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    f = get_format(fmt)
    codes, params = f.quantize_codes(w)
    return QuantLinear(k, n, fmt, f.pack(codes, params))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="K x N (inputs x outputs)")
    p.add_argument("--m", default=None, help="rows (default 1,16,128,1024 on the CPU, 1,4,16,64,128,256,1024 with --gpu)")
    p.add_argument("--formats", default="int4-g128,int8-ch,int3-g128,nf4-b64,fp8-e4m3-ch,int6-g128,bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels" / "kernels.json"))
    p.add_argument("--gpu", action="store_true", help="check and time the GPU kernels on a CUDA device")
    p.add_argument("--e2e-after", type=float, default=420,
                   help="--gpu: run the end-to-end decode bench only if fewer seconds than this have passed")
    p.add_argument("--explore", action="store_true", help="--gpu: search wider tile shapes, log every one's time")
    p.add_argument("--check-formats", default=None, help="--gpu: formats to check (default: every covered one)")
    args = p.parse_args()
    if args.gpu:
        import _kernels_gpu

        args.m = args.m or "1,4,16,64,128,256,1024"
        if args.formats == p.get_default("formats"):
            args.formats = "int4-g128,int4-ch,int8-ch,nf4-b64,fp8-e4m3-ch"
        return _kernels_gpu.run(args)
    args.m = args.m or "1,16,128,1024"
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    bandwidth = copy_bandwidth()
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        dense = torch.randn(n, k) * 0.02
        dense_bf16 = dense.to(torch.bfloat16)
        for fmt in args.formats.split(","):
            layer = layer_for(fmt, n, k)
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k)
                fp32 = timed(lambda: x @ dense.t())
                xb = x.to(torch.bfloat16)
                bf16 = timed(lambda: xb @ dense_bf16.t())
                with kernels.use("auto"):
                    auto = timed(lambda: layer(x))
                with kernels.use("reference"):
                    ref = timed(lambda: layer(x))
                # the slab kernel on the packed formats too: where it overtakes them sets cpu.MAX_ROWS
                slab = timed(lambda: slab_linear(layer, x)) if slab_supports(layer) else None
                read = layer.nbytes() + x.numel() * 4
                rows.append({"k": k, "n": n, "m": m, "format": fmt, "fp32_ms": 1e3 * fp32, "bf16_ms": 1e3 * bf16,
                             "ampq_ms": 1e3 * auto, "reference_ms": 1e3 * ref, "floor_ms": 1e3 * read / bandwidth,
                             "slab_ms": 1e3 * slab if slab is not None else None,
                             "kernel": _kernel_name(layer, m)})
                r = rows[-1]
                print(f"{k}x{n} {fmt} M={m}: ampq {r['ampq_ms']:.3f} ms ({r['kernel']}), fp32 {r['fp32_ms']:.3f}, "
                      f"bf16 {r['bf16_ms']:.3f}, floor {r['floor_ms']:.3f}", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": info, "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}, indent=1))
    os.replace(tmp, out)
    head = ["K x N", "format", "M", "ampq kernel", "ampq ms", "vs fp32", "vs bf16", "slab ms", "reference ms", "floor ms"]
    table = [[f"{r['k']}x{r['n']}", r["format"], r["m"], r["kernel"], r["ampq_ms"], r["fp32_ms"] / r["ampq_ms"],
              r["bf16_ms"] / r["ampq_ms"], r["slab_ms"] if r["slab_ms"] is not None else "-", r["reference_ms"],
              r["floor_ms"]] for r in rows]
    note = (f"{describe(info)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s measured in this run; 'vs' columns are "
            "speed-ups (dense time / ampq time), above 1 is faster")
    print_table("quantized matmul kernels (CPU)", head, table, note)
    md = [f"Measured on {note}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        md.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in t) + " |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def _kernel_name(layer, m: int) -> str:
    from ampq.kernels import cpu, cpu_planes, cpu_slab, cpu_kernel

    names = {cpu.plain_linear: "16-bit", cpu.packed_linear: "packed", cpu_planes.planes_linear: "planes",
             cpu_slab.slab_linear: "slab"}
    return names.get(cpu_kernel(layer, m), "reference")


if __name__ == "__main__":
    main()
