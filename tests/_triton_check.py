"""Run by tests/test_kernels_triton.py in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads
it when kernels are defined, so it must be set before ampq's Triton module is imported)."""

import sys

import torch

from ampq.kernels.reference import reference_linear
from ampq.kernels.triton.lut_gemm import lut_form, lut_linear
from ampq.quantize import quantize_linear

FORMATS = ["int4-g32", "int4-g64-sym", "int4-g128", "int4-ch", "int8-ch", "int8-ch-sym", "int8-g64", "nf4-b64",
           "nf4-b64-dq", "fp4-b64-dq", "fp8-e4m3-ch", "fp8-e5m2", "e2m1-g32"]
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
# formats without a lut form: 3-bit codes, odd rows of 4-bit codes, 16-bit
for fmt, k in [("int3-g64", 64), ("int4-g32", 97), ("bf16", 64)]:
    q = quantize_linear("l", torch.nn.Linear(k, 16), fmt)
    if lut_form(q) is not None:
        failures.append(f"{fmt} with {k} inputs claims a lut form")
print("\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
