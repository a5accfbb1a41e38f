"""``benchmarks/kernel_speed.py --gpu``: check every GPU kernel against the reference, then time it.

1. Checks: each format the Triton kernel covers, fp16 and bf16 activations, M = 1, 9, 16, 100, 300
   (every row bucket), odd N, fresh random inputs each time; the float64 product of the decoded
   weights is the reference (relative Frobenius error <= 2e-3 for fp16, 1e-2 for bf16). FP8 W8A8
   (``torch._scaled_mm``, per-token x per-channel scales) against the float32 W8A8 reference.
2. Kernel time only, as ANCHORS.md's figures were taken: calls captured in a CUDA graph, median of
   100 replays. Weight copies rotate so that the weights read per graph exceed 3x the L2 cache (an
   int4 4096x14336 matrix, 29 MB, would otherwise be read from the 50 MB L2). Against fp16 cuBLAS
   (x @ W^T), torch's int4 kernel (``_weight_int4pack_mm``, tinygemm) and decode + cuBLAS (what
   ampq runs above its Triton row limit); FP8 W8A8 ampq (activation quantization included) and
   ``torch._scaled_mm`` alone. Each tuned Triton result is checked once more against the reference.
3. ``ampq bench`` on a random Llama-shaped model on the GPU, fp16 against int4-g128, when time is left.

Everything is written to $OUT (or benchmarks/results/kernel_speed) as kernels-gpu.json as it goes.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from _machine import describe, machine
from ampq.formats import get_format
from ampq.nn import QuantLinear
from ampq.report import print_table

CHECK_FORMATS = ["int4-g128", "int4-g128-zp", "int4-g32-sym", "int4-ch", "int8-ch", "int8-ch-sym", "nf4-b64-dq",
                 "fp4-b64-dq", "fp8-e4m3-ch", "fp8-e5m2", "e2m1-g32"]
BF16_CHECKS = {"int4-g128", "int8-ch", "nf4-b64-dq", "fp8-e4m3-ch"}  # one per kernel variant (compiles are slow)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
START = time.time()


def log(*a) -> None:
    print(f"[{time.time() - START:6.1f}s]", *a, file=sys.stderr, flush=True)


def make_layer(fmt: str, n: int, k: int, dev, bias: bool = False) -> QuantLinear:
    w = torch.randn(n, k, device=dev) * 0.02 * (1 + 3 * torch.rand(1, k, device=dev))
    f = get_format(fmt)
    codes, params = f.quantize_codes(w.cpu())
    b = torch.randn(n) * 0.1 if bias else None
    return QuantLinear(k, n, fmt, f.pack(codes, params), bias=b).to(dev)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm())


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ layer.dequantize(torch.float32).double().T
    return y + layer.bias.double() if layer.bias is not None else y


# --explore: wider tile searches than the library's lists, to find what each row bucket wants
EXPLORE = {
    "gemv": [(1, 8, 128, 1, 2, 4), (1, 16, 128, 1, 4, 4), (1, 16, 128, 1, 2, 4), (1, 32, 128, 1, 4, 4),
             (1, 64, 128, 1, 4, 4), (1, 16, 256, 1, 4, 4), (1, 32, 256, 1, 4, 3), (1, 16, 128, 2, 4, 4),
             (1, 16, 128, 4, 4, 4), (1, 32, 128, 2, 4, 4), (1, 32, 128, 4, 4, 4), (1, 8, 256, 2, 2, 4),
             (1, 64, 64, 1, 4, 4), (1, 32, 64, 4, 4, 4), (1, 16, 256, 4, 4, 3), (1, 64, 128, 2, 8, 3)],
    "small": [(16, 16, 128, 1, 2, 4), (16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 3), (16, 32, 128, 2, 4, 4),
              (16, 32, 128, 4, 4, 4), (16, 64, 64, 2, 4, 4), (16, 64, 128, 4, 4, 3), (16, 32, 256, 2, 4, 3),
              (16, 128, 64, 1, 4, 3), (16, 16, 256, 4, 2, 3), (16, 64, 256, 1, 4, 3), (16, 32, 64, 8, 4, 4)],
    "mid": [(32, 64, 128, 1, 4, 3), (64, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 3), (64, 128, 64, 2, 4, 3),
            (128, 128, 64, 1, 8, 3), (64, 64, 128, 2, 4, 3), (128, 64, 64, 1, 4, 3), (64, 256, 64, 1, 8, 3),
            (128, 128, 64, 2, 8, 3)],
    "large": [(128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (64, 128, 64, 1, 4, 4), (128, 128, 128, 1, 8, 3),
              (128, 64, 64, 1, 4, 4), (64, 256, 64, 1, 8, 4), (256, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 4)],
}


def explore() -> None:
    from ampq.kernels.triton import lut_gemm

    for name, cfgs in EXPLORE.items():
        lut_gemm._TUNED[name].configs = lut_gemm._variants(cfgs)


def tuning_log(m: int) -> dict:
    """Every config's time for the key tuned last in ``m``'s bucket (the autotuner keeps the last)."""
    from ampq.kernels.triton.lut_gemm import _TUNED, bucket

    timings = getattr(_TUNED[bucket(m)], "configs_timings", None) or {}
    return {str(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}


def check_all(dev, formats=CHECK_FORMATS) -> list[dict]:
    from ampq.kernels.triton.lut_gemm import FIXED, bucket, lut_linear

    results = []
    for fmt in formats:
        layer = make_layer(fmt, 1000, 1536, dev, bias=True)
        for dtype in (torch.float16, torch.bfloat16) if fmt in BF16_CHECKS else (torch.float16,):
            for m in (1, 9, 16, 100, 300):
                x = torch.randn(m, 1536, device=dev, dtype=dtype)
                want = reference(layer, x)
                err = rel_err(lut_linear(layer, x, config=FIXED[bucket(m)]), want)
                ok = err <= TOLERANCE[dtype]
                results.append({"format": fmt, "dtype": str(dtype), "m": m, "error": err, "ok": ok})
                if not ok:
                    log(f"MISMATCH {fmt} {dtype} M={m}: {err:.2e}")
        log(f"checked {fmt}: worst {max(r['error'] for r in results if r['format'].startswith(fmt)):.2e}")
    from ampq.formats.minifloat import MinifloatSpec
    from ampq.kernels.activation import fp8_quantize_tokens
    from ampq.kernels.triton.fp8_rows import fp8_rows

    for (e, man), dt in (((4, 3), torch.float8_e4m3fn), ((5, 2), torch.float8_e5m2)):
        spec = MinifloatSpec(e, man)
        x = torch.randn(33, 5000) * torch.logspace(-6, 3, 5000)
        q, s = fp8_rows(x.to(dev), dt, spec)
        rq, rs = fp8_quantize_tokens(x, spec)
        diff = int((q.float().cpu() != rq).sum()) + int((s.cpu() != rs).sum())
        results.append({"format": f"fp8 rows E{e}M{man}", "dtype": "torch.float32", "m": 33, "error": diff,
                        "ok": diff == 0})
        log(f"checked fp8 rows E{e}M{man}: {diff} values differ from the reference")
    from ampq.kernels.activation import activation_linear

    for fmt, act in (("fp8-e4m3-ch", "fp8-e4m3-token"), ("fp8-e4m3", "fp8-e4m3-token"), ("fp8-e5m2-ch", "fp8-e4m3-token")):
        layer = make_layer(fmt, 1024, 1536, dev, bias=True)
        layer.activation = act
        for m in (1, 16, 300):
            x = torch.randn(m, 1536, device=dev, dtype=torch.bfloat16)
            got = activation_linear(layer, x)
            cpu = layer.to("cpu")
            want = activation_linear(cpu, x.cpu().float())
            layer.to(dev)
            err = rel_err(got.cpu(), want)
            ok = err <= 1e-2
            results.append({"format": f"{fmt} W8A8 {act}", "dtype": "torch.bfloat16", "m": m, "error": err, "ok": ok,
                            "scaled_mm": layer.kernel_cache.scaled_mm_weight is not None})
            if not ok:
                log(f"MISMATCH W8A8 {fmt} M={m}: {err:.2e}")
        log(f"checked W8A8 {fmt}: worst {max(r['error'] for r in results if r['format'].startswith(fmt + ' W8A8')):.2e}"
            f", tensor cores used: {layer.kernel_cache.scaled_mm_weight is not None}")
    return results


def graph_time(fns, replays: int = 100) -> float:
    """Seconds per call: the calls (cycled to at least 10) captured in one CUDA graph, median of replays."""
    calls = max(10, len(fns))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm-up, autotuning
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(16, -(-3 * l2 // max(nbytes, 1))))


def copy_bandwidth(dev) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * src.numel() / graph_time([lambda: dst.copy_(src)], replays=20)


def time_kernels(dev, shapes, ms, formats, save) -> list[dict]:
    from ampq.kernels.activation import activation_linear
    from ampq.kernels.triton.lut_gemm import lut_linear

    rows = []
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        w16s = [(torch.randn(n, k, device=dev) * 0.02).half() for _ in range(copies_for(2 * n * k))]
        layers = {}
        for fmt in formats:
            first = make_layer(fmt, n, k, dev)
            count = copies_for(first.nbytes())
            layers[fmt] = [first] + [copy.deepcopy(first) for _ in range(count - 1)]  # same values, own memory
        fp8 = make_layer("fp8-e4m3-ch", n, k, dev)
        fp8.activation = "fp8-e4m3-token"
        fp8 = [fp8] + [copy.deepcopy(fp8) for _ in range(copies_for(n * k) - 1)]
        tiny = None
        if hasattr(torch.ops.aten, "_convert_weight_to_int4pack"):
            try:
                tiny = []
                for _ in range(copies_for(n * k // 2)):
                    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
                    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
                    tiny.append((packed, torch.rand(k // 128, n, 2, device=dev, dtype=torch.bfloat16)))
            except Exception as e:
                log(f"torch int4 kernel unavailable: {type(e).__name__}: {e}")
                tiny = None
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            row = {"k": k, "n": n, "m": m, "weight_copies": len(w16s)}

            def measure(key, fns):
                try:
                    row[key] = 1e3 * graph_time(fns)
                except Exception as e:  # one failed measurement must not cost the table
                    log(f"{key} at {k}x{n} M={m}: {type(e).__name__}: {e}")

            measure("fp16_ms", [lambda w=w: x @ w.t() for w in w16s])
            for fmt, ls in layers.items():
                lut_linear(ls[0], x)  # tunes this key
                row[f"{fmt}_tuning"] = tuning_log(m)
                measure(f"{fmt}_ms", [lambda layer=layer: lut_linear(layer, x) for layer in ls])
                row[f"{fmt}_error"] = rel_err(lut_linear(ls[0], x), reference(ls[0], x))
                if fmt == formats[0]:
                    measure("ampq_auto_ms", [lambda layer=layer: layer(x) for layer in ls])
            if tiny:
                measure("torch_int4_ms",
                        [lambda p=p, sz=sz: torch.ops.aten._weight_int4pack_mm(xb, p, 128, sz) for p, sz in tiny])
            measure("fp8_w8a8_ms", [lambda layer=layer: activation_linear(layer, xb) for layer in fp8])
            row["fp8_w8a8_tensor_cores"] = fp8[0].kernel_cache.scaled_mm_weight is not None
            if row["fp8_w8a8_tensor_cores"]:
                x8, sa = x.to(torch.float8_e4m3fn), torch.ones(m, 1, device=dev)
                ws = fp8[0].kernel_cache.scaled_mm_weight[1]
                measure("scaled_mm_only_ms",
                        [lambda layer=layer: torch._scaled_mm(x8, layer.kernel_cache.scaled_mm_weight[0].t(), scale_a=sa,
                                                              scale_b=ws, out_dtype=torch.bfloat16) for layer in fp8])
            rows.append(row)
            log({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()})
            save(rows)
        del w16s, layers, fp8, tiny
        torch.cuda.empty_cache()
    return rows


def decode_bench(dev) -> list[dict]:
    """``ampq.bench`` on a random Llama-shaped model (2048 wide, 8 blocks): fp16 against int4-g128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ampq.bench import bench
    from ampq import quantize

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000)
    torch.manual_seed(0)
    out = []
    cpu_model = LlamaForCausalLM(cfg).half().eval()
    for name in ("fp16", "int4-g128"):
        model = copy.deepcopy(cpu_model) if name == "fp16" else quantize(cpu_model, name, progress=False)
        model.to(dev)
        for r in bench(model, batches=(1, 16), prompt_tokens=128, new_tokens=32, repeats=3):
            out.append({"model": name, **r.__dict__})
            log(out[-1])
        del model
        torch.cuda.empty_cache()
    return out


def write_md(result: dict, path: Path) -> None:
    """The speed-up table (fp16 time / kernel time) and the checks, as markdown."""
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r if k.endswith("_ms") and k != "fp16_ms"))
    info = result["machine"]
    lines = [f"Measured on {describe(info)}, triton {info.get('triton')}; kernel time only: calls captured in a "
             "CUDA graph, median of 100 replays, weight copies rotated so each graph reads more than 3x the L2 "
             "cache. Cells are speed-ups over fp16 cuBLAS (fp16 time / kernel time), above 1 is faster.", "",
             "| K x N | M | fp16 ms | " + " | ".join(k.removesuffix("_ms") for k in keys) + " |",
             "|" + "---|" * (3 + len(keys))]
    for r in rows:
        cells = [f"{r['fp16_ms'] / r[k]:.2f}" if r.get(k) and r.get("fp16_ms") else "-" for k in keys]
        lines.append(f"| {r['k']}x{r['n']} | {r['m']} | {r.get('fp16_ms', float('nan')):.4f} | " + " | ".join(cells) + " |")
    checks = result.get("checks", [])
    bad = [c for c in checks if not c["ok"]]
    lines += ["", f"Checks against the reference on the GPU: {len(checks) - len(bad)} of {len(checks)} within tolerance."]
    lines += [f"- not within: {c['format']} {c['dtype']} M={c['m']}: {c['error']}" for c in bad]
    path.write_text("\n".join(lines) + "\n")


def run(args) -> None:
    dev = torch.device("cuda")
    info = machine()
    import triton

    info["triton"] = triton.__version__
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": info}

    def save(rows=None):
        if rows is not None:
            result["rows"] = rows
        tmp = out_dir / "kernels-gpu.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, out_dir / "kernels-gpu.json")

    log(describe(info), "triton", triton.__version__)
    result["copy_bandwidth_gb_s"] = copy_bandwidth(dev) / 1e9
    log(f"copy bandwidth {result['copy_bandwidth_gb_s']:.0f} GB/s")
    if args.explore:
        explore()
    result["checks"] = check_all(dev, args.check_formats.split(",") if args.check_formats else CHECK_FORMATS)
    save()
    failed = [c for c in result["checks"] if not c["ok"]]
    rows = time_kernels(dev, args.shapes.split(","), [int(v) for v in args.m.split(",")],
                        args.formats.split(","), save)
    if time.time() - START < args.e2e_after:
        try:
            result["decode"] = decode_bench(dev)
        except Exception as e:  # the kernel table stands without it
            log(f"decode bench failed: {type(e).__name__}: {e}")
            result["decode_error"] = f"{type(e).__name__}: {e}"
    from ampq.kernels.triton.lut_gemm import _TUNED

    result["tuned"] = {name: {str(key): str(cfg) for key, cfg in tuner.cache.items()} for name, tuner in _TUNED.items()}
    save(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r if k.endswith("_ms") and k != "fp16_ms"))
    table = [[f"{r['k']}x{r['n']}", r["m"], r.get("fp16_ms")]
             + [r["fp16_ms"] / r[k] if r.get(k) and r.get("fp16_ms") else None for k in keys] for r in rows]
    note = f"{describe(info)}, triton {info['triton']}; CUDA graph, median of 100 replays, weights rotated past L2"
    head = ["K x N", "M", "fp16 ms"] + [k.removesuffix("_ms") for k in keys]
    print_table("kernel time on the GPU (speed-up over fp16 cuBLAS, above 1 is faster)", head, table, note)
    write_md(result, out_dir / "kernels-gpu.md")
    print(f"checks: {len(result['checks']) - len(failed)} of {len(result['checks'])} within tolerance")
    if failed:
        raise SystemExit(f"{len(failed)} kernel checks failed: {failed[:3]}")
