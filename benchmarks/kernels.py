"""Quantized matmul kernels against dense matmul at Llama-3-8B shapes, and the floor that memory
bandwidth sets.

    python benchmarks/kernels.py [--shapes 4096x4096,4096x14336,14336x4096] [--m 1,16,128,1024]
    python benchmarks/kernels.py --gpu      # on a CUDA machine: check every kernel, then time it

GPU (``--gpu``): first every format's Triton kernel against the reference kernel on the device (the
run stops on a mismatch), then kernel time only, as the reference figures in ANCHORS.md were taken:
10 calls captured in a CUDA graph, median of 100 replays, against fp16 cuBLAS (x @ W^T) and
torch's int4 kernel (``_weight_int4pack_mm``) at the same shapes; FP8 W8A8 with ``torch._scaled_mm``.

CPU: ampq's dispatch (`auto`: packed int4/int8 kernels up to 128/32 rows, else decode + matmul), the
reference kernel alone, torch's dense fp32 and bf16 matmuls. The floor is the bytes a kernel must
read (weights as stored, plus activations) over the copy bandwidth measured on this machine in the
same run. Times are medians of repeated calls after a warm-up; ratios are to dense fp32 and bf16
measured in the same run. Writes benchmarks/results/kernels.json and .md.
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


def graph_time(fn, calls: int = 10, replays: int = 100) -> float:
    """Seconds per call: ``calls`` calls captured in one CUDA graph, median over replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def gpu(args) -> None:
    from ampq.kernels.triton.lut_gemm import lut_linear

    dev = torch.device("cuda")
    info = machine()
    # 1. correctness on the device, every covered format
    for fmt in ("int4-g128", "int4-ch", "int8-ch", "nf4-b64", "fp8-e4m3-ch"):
        layer = layer_for(fmt, 512, 1024).to(dev)
        x = torch.randn(7, 1024, device=dev, dtype=torch.float16)
        want = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32))
        err = float((lut_linear(layer, x).float() - want).abs().max() / want.abs().max())
        print(f"check {fmt}: relative error {err:.2e}", file=sys.stderr, flush=True)
        if err > 5e-3:
            raise SystemExit(f"{fmt}: the Triton kernel disagrees with the reference ({err:.2e})")
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w16 = (torch.randn(n, k, device=dev) * 0.02).half()
        layers = {fmt: layer_for(fmt, n, k).to(dev) for fmt in args.formats.split(",")}
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
        tiny = torch.ops.aten._convert_weight_to_int4pack(codes, 8) if hasattr(torch.ops.aten, "_convert_weight_to_int4pack") else None
        sz = torch.rand(k // 128, n, 2, device=dev, dtype=torch.bfloat16)
        w8 = w16.to(torch.float8_e4m3fn)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = {"k": k, "n": n, "m": m, "fp16_ms": 1e3 * graph_time(lambda: x @ w16.t())}
            for fmt, layer in layers.items():
                row[f"{fmt}_ms"] = 1e3 * graph_time(lambda: lut_linear(layer, x))
            if tiny is not None:
                xb = x.to(torch.bfloat16)
                row["torch_int4_ms"] = 1e3 * graph_time(lambda: torch.ops.aten._weight_int4pack_mm(xb, tiny, 128, sz))
            x8, one = x.to(torch.float8_e4m3fn), torch.ones((), device=dev)
            try:
                row["fp8_w8a8_ms"] = 1e3 * graph_time(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                               out_dtype=torch.float16))
            except RuntimeError as e:  # shapes _scaled_mm refuses (M not a multiple of 16 on some builds)
                row["fp8_w8a8_ms"] = None
                print(f"_scaled_mm at M={m}: {e}", file=sys.stderr)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    out = Path(args.out).with_name("kernels-gpu.json")
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    keys = [k for k in rows[0] if k.endswith("_ms") and k != "fp16_ms"]
    table = [[f"{r['k']}x{r['n']}", r["m"], r["fp16_ms"]] + [r["fp16_ms"] / r[k] if r.get(k) else None for k in keys]
             for r in rows]
    print_table("kernel time on the GPU (speed-up over fp16 cuBLAS, above 1 is faster)",
                ["K x N", "M", "fp16 ms"] + [k.removesuffix("_ms") for k in keys], table,
                f"{describe(info)}; 10 calls in a CUDA graph, median of 100 replays")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="K x N (inputs x outputs)")
    p.add_argument("--m", default="1,16,128,1024")
    p.add_argument("--formats", default="int4-g128,int8-ch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    p.add_argument("--gpu", action="store_true", help="check and time the Triton kernels on a CUDA device")
    args = p.parse_args()
    if args.gpu:
        return gpu(args)
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
                read = layer.nbytes() + x.numel() * 4
                rows.append({"k": k, "n": n, "m": m, "format": fmt, "fp32_ms": 1e3 * fp32, "bf16_ms": 1e3 * bf16,
                             "ampq_ms": 1e3 * auto, "reference_ms": 1e3 * ref, "floor_ms": 1e3 * read / bandwidth,
                             "kernel": "packed" if m <= _max_rows(layer) else "decode+matmul"})
                r = rows[-1]
                print(f"{k}x{n} {fmt} M={m}: ampq {r['ampq_ms']:.3f} ms ({r['kernel']}), fp32 {r['fp32_ms']:.3f}, "
                      f"bf16 {r['bf16_ms']:.3f}, floor {r['floor_ms']:.3f}", file=sys.stderr, flush=True)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": info, "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}, indent=1))
    os.replace(tmp, out)
    head = ["K x N", "format", "M", "ampq kernel", "ampq ms", "vs fp32", "vs bf16", "reference ms", "floor ms"]
    table = [[f"{r['k']}x{r['n']}", r["format"], r["m"], r["kernel"], r["ampq_ms"], r["fp32_ms"] / r["ampq_ms"],
              r["bf16_ms"] / r["ampq_ms"], r["reference_ms"], r["floor_ms"]] for r in rows]
    note = (f"{describe(info)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s measured in this run; 'vs' columns are "
            "speed-ups (dense time / ampq time), above 1 is faster")
    print_table("quantized matmul kernels (CPU)", head, table, note)
    md = [f"Measured on {note}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        md.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in t) + " |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


def _max_rows(layer) -> int:
    from ampq.kernels.cpu import max_rows

    return max_rows(layer)


if __name__ == "__main__":
    main()
