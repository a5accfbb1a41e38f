"""Per-token FP8 quantization of activations in one Triton kernel (W8A8's input side).

One program per row: the row's absmax, its scale s = absmax / max_finite, then x / s rounded to
nearest even into the fp8 type (saturating), as ``ampq.kernels.activation.fp8_quantize_tokens``
defines it. torch's eager ops take six kernels for the same, whose launches cost more than the
matmul at small batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_to_grid(v, DROP: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_C: tl.constexpr):
    """v (float32, |v| <= max finite) rounded to nearest even on the fp8 grid, still as float32:
    normal numbers by rounding the float32 mantissa to 23 - DROP bits, subnormals by adding and
    subtracting SUB_C = 1.5 * 2^(23 + exponent of the subnormal step). The fp8 cast that follows
    is then exact (Triton's interpreter rounds that cast wrongly across binades; the GPU would not)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & ~((1 << DROP) - 1)
    normal = bits.to(tl.float32, bitcast=True)
    sub = (v + SUB_C) - SUB_C
    return tl.where(tl.abs(v) < MIN_NORMAL, sub, normal)


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, MAX_FINITE: tl.constexpr, DROP: tl.constexpr,
                     MIN_NORMAL: tl.constexpr, SUB_C: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)))
    s = tl.math.div_rn(tl.max(amax, axis=0), MAX_FINITE)
    tl.store(s_ptr + row, s)
    safe = tl.where(s > 0, s, 1.0)
    for k0 in range(0, K, BLOCK):
        rk = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        q = _round_to_grid(tl.minimum(tl.maximum(tl.math.div_rn(x, safe), -MAX_FINITE), MAX_FINITE), DROP, MIN_NORMAL, SUB_C)
        tl.store(q_ptr + row * K + rk, q.to(q_ptr.dtype.element_ty), mask=rk < K)


def fp8_rows(x: torch.Tensor, dtype: torch.dtype, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in ``dtype``, float32 scales (rows, 1)) of 2-D ``x``, one scale per row; ``spec`` the
    MinifloatSpec that ``dtype`` holds."""
    m, k = x.shape
    min_normal = 2.0 ** (1 - spec.bias)
    q = torch.empty(m, k, dtype=dtype, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = min(4096, triton.next_power_of_2(k))
    _fp8_rows_kernel[(m,)](x, q, s, k, x.stride(0), MAX_FINITE=spec.max_finite, DROP=23 - spec.man_bits,
                           MIN_NORMAL=min_normal, SUB_C=1.5 * 2.0 ** (23 + (1 - spec.bias) - spec.man_bits),
                           BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return q, s
