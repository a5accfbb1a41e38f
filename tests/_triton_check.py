"""Run by tests/test_kernels_triton.py in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads
it when kernels are defined, so it must be set before ampq's Triton module is imported)."""

import sys

import torch

from ampq.kernels.reference import reference_linear
from ampq.kernels.triton.lut_gemm import CONFIGS, lut_form, lut_linear
from ampq.pipeline.blockwise import quantize_linear

FORMATS = ["int4-g32", "int4-g64-sym", "int4-g128", "int4-ch", "int8-ch", "int8-ch-sym", "int8-g64", "nf4-b64",
           "nf4-b64-dq", "fp4-b64-dq", "fp8-e4m3-ch", "fp8-e5m2", "e2m1-g32", "mxfp4"]
failures = []
for fmt in FORMATS:
    for n, k, rows, bias in [(80, 96, 5, True), (64, 256, 1, False), (33, 130, 17, True)]:
        torch.manual_seed(n + k)
        lin = torch.nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            lin.weight.mul_(torch.rand(1, k) * 4)
        q = quantize_linear("l", lin, fmt)
        assert lut_form(q) is not None, fmt
        x = torch.randn(2, rows, k)
        want = reference_linear(q, x)
        got = lut_linear(q, x)
        err = float((got - want).abs().max() / want.abs().max())
        if got.shape != want.shape or got.dtype != want.dtype or err > 1e-5:
            failures.append(f"{fmt} {n}x{k} rows {rows}: error {err:.2e}")
        for dtype in (torch.float16,):
            xh = x.to(dtype)
            err = float((lut_linear(q, xh).float() - reference_linear(q, xh.float())).abs().max() / want.abs().max())
            if err > 5e-3:
                failures.append(f"{fmt} {n}x{k} rows {rows} {dtype}: error {err:.2e}")
# every tile shape the GPU may pick (split-K, matrix-vector, per-tile or per-element scales, K a
# multiple of the tile or not), on one format of each decoding path
for fmt in ["int4-g128", "int4-g32-sym", "nf4-b64-dq", "int8-ch", "fp8-e4m3-ch"]:
    for n, k in [(40, 256), (33, 130)]:
        torch.manual_seed(n * k)
        q = quantize_linear("l", torch.nn.Linear(k, n), fmt)
        for name, configs in CONFIGS.items():
            rows = 1 if name == "gemv" else 9
            x = torch.randn(rows, k)
            want = reference_linear(q, x)
            for config in configs:
                for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3)):
                    got = lut_linear(q, x.to(dtype), config=config).float()
                    err = float((got - want).abs().max() / want.abs().max())
                    if err > tol:
                        failures.append(f"{fmt} {n}x{k} {config} {dtype}: error {err:.2e}")
# bfloat16 activations (the interpreter's bf16 tl.dot is broken, so the matrix-vector path only)
q = quantize_linear("l", torch.nn.Linear(256, 40), "int4-g128")
x = torch.randn(1, 256)
err = float((lut_linear(q, x.bfloat16()).float() - reference_linear(q, x.bfloat16().float())).abs().max())
if err > 1e-2 * float(reference_linear(q, x).abs().max()):
    failures.append(f"int4-g128 bf16 matrix-vector: error {err:.2e}")
# per-token fp8 quantization of activations (W8A8's input side): exactly the reference's codes and
# scales, subnormals and an all-zero row included
from ampq.formats.minifloat import MinifloatSpec  # noqa: E402
from ampq.kernels.activation import fp8_quantize_tokens  # noqa: E402
from ampq.kernels.triton.fp8_rows import fp8_rows  # noqa: E402

for (e, m), dtype in (((4, 3), torch.float8_e4m3fn), ((5, 2), torch.float8_e5m2)):
    spec = MinifloatSpec(e, m)
    torch.manual_seed(e)
    x = torch.randn(9, 5000) * torch.logspace(-6, 3, 5000)
    x[2] = 0
    q, s = fp8_rows(x, dtype, spec)
    rq, rs = fp8_quantize_tokens(x, spec)
    if not (torch.equal(q.float(), rq) and torch.equal(s, rs)):
        failures.append(f"fp8 rows E{e}M{m}: {int((q.float() != rq).sum())} codes differ")
# formats without a lut form: 3-bit codes, odd rows of 4-bit codes, 16-bit
for fmt, k in [("int3-g64", 64), ("int4-g32", 97), ("bf16", 64)]:
    q = quantize_linear("l", torch.nn.Linear(k, 16), fmt)
    if lut_form(q) is not None:
        failures.append(f"{fmt} with {k} inputs claims a lut form")
print("\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
