"""One Triton kernel for every format whose decoded weight is ``lut[q] * a + b`` per group, with
4- or 8-bit codes: integers (asymmetric: lut = q, a = scale, b = min; symmetric: lut = q - 2^(k-1)),
bitsandbytes NF4/FP4 (lut = the codebook, a = absmax), and minifloats such as FP8 E4M3/E5M2 and
E2M1 (lut = every code's value, a = scale).

y = x W^T is computed tile by tile: each program loads a tile of codes (two per byte for 4 bits,
low nibble first, as ampq stores them), looks them up, applies its groups' a and b, and accumulates
``tl.dot`` in float32. Weights are never decoded whole. Correctness is checked against the
reference kernel in the Triton interpreter (tests/test_kernels_triton.py); speed needs a GPU
(benchmarks/kernels.py --gpu).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ampq.formats.integer import IntegerFormat
from ampq.formats.minifloat import MinifloatFormat
from ampq.formats.normal_float import NormalFloatFormat


def lut_form(layer) -> dict | None:
    """The (lut, a, b) decomposition of ``layer``'s format, or None when it has none here."""
    fmt = layer.format
    k = layer.in_features
    if fmt.bits not in (4, 8) or (fmt.bits == 4 and k % 2):
        return None  # rows must start on a byte
    codes, params = fmt.unpack(layer.stored(), layer.shape)
    levels = torch.arange(1 << fmt.bits, dtype=torch.float32)
    b = None
    if isinstance(fmt, IntegerFormat):
        lut, a = (levels - fmt.half if fmt.symmetric else levels), params.values["scale"]
        b = None if fmt.symmetric else params.values["min"]
    elif isinstance(fmt, NormalFloatFormat):
        lut, a = fmt.code.float(), params.values["absmax"]
    elif isinstance(fmt, MinifloatFormat):
        lut, a = fmt.spec.decode(levels.to(torch.int32)).float(), params.values["scale"]
    else:
        return None
    groups = fmt.n_groups(k) if fmt.group_size != 0 else 1
    width = fmt.group_width(k)
    a = a.float().reshape(-1, groups).expand(layer.out_features, groups).contiguous()
    b = b.float().reshape(-1, groups).expand(layer.out_features, groups).contiguous() if b is not None else None
    return {"bits": fmt.bits, "codes": layer.stored()["codes"].reshape(-1), "lut": lut.contiguous(),
            "a": a, "b": b, "groups": groups, "width": width}


@triton.jit
def _lut_gemm_kernel(x_ptr, codes_ptr, lut_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
                     M, N, K, n_groups, width, stride_xm, stride_ym,
                     BITS: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        wmask = (rn[:, None] < N) & kmask[None, :]
        if BITS == 4:
            rh = k0 // 2 + tl.arange(0, BK // 2)
            packed = tl.load(codes_ptr + rn[:, None] * (K // 2) + rh[None, :],
                             mask=(rn[:, None] < N) & (rh[None, :] < K // 2), other=0)
            q = tl.interleave(packed & 0xF, packed >> 4)
        else:
            q = tl.load(codes_ptr + rn[:, None] * K + rk[None, :], mask=wmask, other=0)
        w = tl.load(lut_ptr + q.to(tl.int32))
        g = rk // width
        offs = rn[:, None] * n_groups + g[None, :]
        w = w * tl.load(a_ptr + offs, mask=wmask, other=0.0)
        if HAS_B:
            w = w + tl.load(b_ptr + offs, mask=wmask, other=0.0)
        w = tl.where(wmask, w, 0.0)
        if FP32:  # exact float32 products, as the reference kernel
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:  # fp16/bf16 activations: the weights in the same dtype, tensor cores, fp32 sums
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def lut_linear(layer, x: torch.Tensor, form: dict | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for a QuantLinear whose format :func:`lut_form` covers."""
    form = form or layer.__dict__.get("_triton_form")
    if form is None:
        form = layer.__dict__["_triton_form"] = {k: (v.to(x.device) if isinstance(v, torch.Tensor) else v)
                                                 for k, v in lut_form(layer).items()}
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k, n = x2.shape[0], shape[-1], layer.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias = layer.bias.float() if layer.bias is not None else None
    bm, bn, bk = 16, 64, 64
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _lut_gemm_kernel[grid](x2, form["codes"], form["lut"], form["a"], form["b"] if form["b"] is not None else form["a"],
                           bias if bias is not None else form["a"], y, m, n, k, form["groups"], form["width"],
                           x2.stride(0), y.stride(0), BITS=form["bits"], HAS_B=form["b"] is not None,
                           HAS_BIAS=bias is not None, FP32=x.dtype == torch.float32, BM=bm, BN=bn, BK=bk)
    return y.reshape(*shape[:-1], n)
