"""One Triton kernel for every format whose decoded weight is ``lut[q] * a + b`` per group, with
4- or 8-bit codes: integers (w = q * scale + min, symmetric ones with min = -2^(k-1) * scale, so
no lookup), bitsandbytes NF4/FP4 (lut = the codebook, a = absmax) and minifloats such as FP8
E4M3/E5M2 and E2M1 (lut = every code's value, a = scale).

y = x W^T is computed tile by tile: each program loads a tile of codes (two per byte for 4 bits,
low nibble first, as ampq stores them), decodes them in registers and accumulates in float32.
Weights are never decoded whole. Two shapes of the same loop, picked by the number of rows M:

- M = 1 (decoding one sequence): a matrix-vector product, ``sum(w * x)`` over K on the CUDA cores;
- small and large M: ``tl.dot`` on the tensor cores with the weights cast to the activations' dtype.

Memory-bound shapes need many bytes in flight, so a program may take only a slice of K (split-K)
and add its partial sums to the output atomically (the output starts at zero): results then vary
at rounding level from run to run. Where a tile's K-range lies inside one group (the tile width
divides the group width), a and b are loaded once per tile and row instead of per element.

Tile shapes are tuned per (row bucket, N, K) on the GPU (``triton.autotune``, the first call of a
shape; a few seconds); in Triton's interpreter (CPU tests) a fixed shape runs. Correctness is
checked against the reference kernel in the interpreter (tests/_triton_check.py), speed on a GPU
(benchmarks/kernel_speed.py --gpu; the figures, against fp16 cuBLAS and against decoding the weight
with torch ops first, are in benchmarks/results/kernel_speed/kernels-gpu.md). It serves every
number of rows because decoding first loses to it everywhere; the formats whose values come from a
table lookup per element (NF4, FP8) gain least.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ampq.kernels.lut import lut_form


@triton.jit
def _lut_gemm_kernel(x_ptr, codes_ptr, lut_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
                     M, N, K, n_groups, width, stride_xm, stride_ym, M_KEY,
                     BITS: tl.constexpr, LUT: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr,
                     FP32: tl.constexpr, GEMV: tl.constexpr, TILE_SCALE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    # A version without load masks, with pointer increments, integer-to-float by the 2^23 trick,
    # nibbles kept apart (even and odd inputs) and the scales applied after the dot measured slower
    # on an H200 at every M (benchmarks/results/kernel_speed/kernels-gpu-variant-b.json): this simpler one stays.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, k_tiles)
    if GEMV:
        acc = tl.zeros((BN,), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(first, last):
        k0 = kt * BK
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K
        if BITS == 4:
            rh = k0 // 2 + tl.arange(0, BK // 2)
            packed = tl.load(codes_ptr + rn[:, None] * (K // 2) + rh[None, :],
                             mask=nmask[:, None] & (rh[None, :] < K // 2), other=0)
            q = tl.interleave(packed & 0xF, packed >> 4)
        else:
            q = tl.load(codes_ptr + rn[:, None] * K + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        if LUT:
            w = tl.load(lut_ptr + q.to(tl.int32))
        else:
            w = q.to(tl.float32)
        # masked codes decode to finite values; the inputs they meet are masked to 0
        if TILE_SCALE:  # the tile lies in one group: one a (and b) per row
            g = k0 // width
            a = tl.load(a_ptr + rn * n_groups + g, mask=nmask, other=0.0)
            if HAS_B:
                w = w * a[:, None] + tl.load(b_ptr + rn * n_groups + g, mask=nmask, other=0.0)[:, None]
            else:
                w = w * a[:, None]
        else:
            offs = rn[:, None] * n_groups + (rk // width)[None, :]
            wmask = nmask[:, None] & kmask[None, :]
            w = w * tl.load(a_ptr + offs, mask=wmask, other=0.0)
            if HAS_B:
                w = w + tl.load(b_ptr + offs, mask=wmask, other=0.0)
        if GEMV:
            x = tl.load(x_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :],
                        other=0.0)
            if FP32:  # exact float32 products, as the reference kernel
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:  # fp16/bf16 activations: the weights in the same dtype, tensor cores, fp32 sums
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        if pid_k == 0:
            if GEMV:
                acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0)
            else:
                acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
    if GEMV:
        out = y_ptr + rn
        omask = nmask
    else:
        out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        omask = (rm[:, None] < M) & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(out, acc.to(y_ptr.dtype.element_ty), mask=omask)


def _zero_output(nargs):
    nargs["y_ptr"].zero_()


def _config(bm, bn, bk, split, warps, stages, tile_scale) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split, "TILE_SCALE": tile_scale},
                         num_warps=warps, num_stages=stages, pre_hook=_zero_output if split > 1 else None)


def _variants(shapes) -> list[triton.Config]:
    """Each shape twice (scales per tile or per element); the pruning keeps the one that fits."""
    return [_config(*c, t) for c in shapes for t in (True, False)]


# (BM, BN, BK, SPLIT_K, warps, stages) per row bucket; small M is bound by reading the weights, so
# those configs trade tile size against programs in flight (split-K); large M by the tensor cores.
CONFIGS = {
    "gemv": [(1, 16, 128, 4, 4, 4), (1, 32, 128, 4, 4, 4), (1, 16, 128, 2, 4, 4), (1, 32, 128, 2, 4, 4),
             (1, 16, 128, 8, 4, 4), (1, 64, 128, 4, 4, 4), (1, 32, 64, 4, 4, 4), (1, 32, 128, 1, 4, 4)],
    "small": [(16, 64, 128, 4, 4, 3), (16, 32, 128, 4, 4, 4), (16, 32, 128, 2, 4, 4), (16, 64, 128, 1, 4, 3),
              (16, 32, 64, 8, 4, 4)],
    "mid": [(64, 64, 128, 2, 4, 3), (64, 64, 64, 1, 4, 4), (128, 64, 64, 1, 4, 3), (128, 128, 64, 2, 8, 3),
            (64, 64, 128, 1, 4, 3)],
    "large": [(256, 128, 64, 1, 8, 3), (128, 128, 64, 1, 8, 3), (128, 128, 128, 1, 8, 3), (128, 256, 64, 1, 8, 3)],
}
# the shape the interpreter (and a GPU with tuning off) runs, per bucket
FIXED = {"gemv": (1, 32, 128, 1, 4, 4), "small": (16, 64, 128, 1, 4, 3), "mid": (64, 64, 64, 1, 4, 4),
         "large": (128, 128, 64, 1, 8, 3)}


def bucket(m: int) -> str:
    return "gemv" if m == 1 else "small" if m <= 16 else "mid" if m <= 128 else "large"


def _prune(configs, named_args, **kwargs):
    # keep each shape's variant that fits the layer; drop K-tiles much wider than the layer and
    # splits with nothing to do
    k, width = named_args["K"], named_args["width"]
    keep = [c for c in configs if c.kwargs["TILE_SCALE"] == (width % c.kwargs["BK"] == 0)
            and c.kwargs["BK"] <= max(64, triton.next_power_of_2(k))
            and c.kwargs["SPLIT_K"] <= triton.cdiv(k, c.kwargs["BK"])
            and (c.kwargs["SPLIT_K"] == 1 or named_args["y_ptr"].dtype != torch.bfloat16)]  # no bf16 atomics
    # nothing fits (K narrower than every tile): one tile per row, no split, so no atomics
    return keep or [c for c in configs if not c.kwargs["TILE_SCALE"] and c.kwargs["SPLIT_K"] == 1][:1]


_TUNED = {name: triton.autotune(_variants(cfgs),
                                key=["M_KEY", "N", "K", "width"],
                                prune_configs_by={"early_config_prune": _prune})(_lut_gemm_kernel)
          for name, cfgs in CONFIGS.items()}


def _tune() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") != "1" and os.environ.get("AMPQ_TRITON_TUNE", "1") != "0"


def lut_linear(layer, x: torch.Tensor, form: dict | None = None, config: tuple | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for a QuantLinear whose format :func:`lut_form` covers. ``config`` forces
    one (BM, BN, BK, SPLIT_K, warps, stages) instead of the tuned or fixed one (tests)."""
    cache = layer.kernel_cache
    form = form or cache.triton_form
    if form is None or form["codes"].device != x.device:
        form = cache.triton_form = {k: (v.to(x.device) if isinstance(v, torch.Tensor) else v)
                                                 for k, v in lut_form(layer).items()}
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k, n = x2.shape[0], shape[-1], layer.out_features
    bias = cache.triton_bias
    if layer.bias is not None and (bias is None or bias.device != x.device):
        bias = cache.triton_bias = layer.bias.detach().float().to(x.device)
    name = bucket(m)
    fp32 = x.dtype == torch.float32
    width = form["width"]
    a = form["a"]
    args = (x2, form["codes"], form["lut"] if form["lut"] is not None else a, a,
            form["b"] if form["b"] is not None else a, bias if bias is not None else a)
    tail = (m, n, k, form["groups"], width, x2.stride(0), n, triton.next_power_of_2(m))
    flags = dict(BITS=form["bits"], LUT=form["lut"] is not None, HAS_B=form["b"] is not None,
                 HAS_BIAS=bias is not None, FP32=fp32, GEMV=name == "gemv")

    def grid(meta):
        return (triton.cdiv(n, meta["BN"]), triton.cdiv(m, meta["BM"]), meta["SPLIT_K"])

    if config is None and _tune() and x.is_cuda:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # split-K configs zero it (pre_hook)
        _TUNED[name][grid](*args, y, *tail, **flags)
    else:
        bm, bn, bk, split, warps, stages = config or FIXED[name]
        flags["GEMV"] = bm == 1
        if bm == 1 and m != 1:
            raise ValueError("the matrix-vector shape (BM = 1) takes one row")
        y = (torch.zeros if split > 1 else torch.empty)(m, n, dtype=x.dtype, device=x.device)
        _lut_gemm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), split)](
            *args, y, *tail, TILE_SCALE=width % bk == 0, BM=bm, BN=bn, BK=bk, SPLIT_K=split,
            num_warps=warps, num_stages=stages, **flags)
    return y.reshape(*shape[:-1], n)
