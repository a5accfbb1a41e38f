"""CPU kernel for decoding with the formats torch has no packed kernel for (NF4/FP4, FP8, E2M1,
grouped int8, int5/int6, the 6-bit minifloats: every quantized format but int2-4 and int8 per
channel, which cpu.py runs): the decoded weight rewritten as a sum of three int4 planes, run as one
call of torch's packed int4 kernel.

Each plane is an asymmetric int4 quantization, in groups of 64 inputs, of what the planes before it
left over: w = sum_j ((q_j - 8) * s_j + z_j), with the scales and offsets in bf16 as the kernel
takes them (each plane's residual is taken after that rounding, so the next plane corrects it).
Each plane divides what is left by about 15, so three leave about 3e-4 of the largest weight (two
left 4e-3): far below the 2^-9 relative rounding of the bf16 activations the kernel runs with, so
the products agree with the reference kernel as closely as the packed int4/int8 kernels do
(tests/test_kernels_cpu.py: 0.25% against their 0.3%).
The planes sit side by side along the inputs, so the product is one call on the activations
repeated three times.

Why: a table lookup per weight (cpu_slab.py) costs far more than reading the weight; on this 2-core
CPU three int4 planes (1.5 bytes per weight) run a one-row product in about the time of a dense
bf16 one, where the slab kernel takes 7-9x that. The price is memory: 1.7 bytes per weight kept
next to the stored codes (an NF4 layer then holds 2.3 bytes per weight, more than bf16's 2);
``kernels.use("lean")`` keeps every layer on the slab kernel, which adds nothing.
"""

from __future__ import annotations

import torch

from ampq.formats.plain import PlainFloatFormat
from ampq.kernels import cpu, cpu_slab

PLANES = 3
DTYPE = torch.bfloat16
# Up to how many rows this kernel runs; beyond, the slab kernel decodes each weight once per call
# and wins (the crossover benchmarks/kernel_speed.py measures, docs/kernels.md).
MAX_ROWS = 16
# For formats the slab kernel cannot take (int5/int6, 6-bit minifloats, partial last groups) the
# alternative is the reference kernel, which decodes the whole weight each call; the planes' three
# products cost more per row, so the reference wins again between 256 and 512 rows.
MAX_ROWS_WITHOUT_SLAB = 256
_CHUNK = 1024  # output rows decoded at a time when preparing: bounds the float32 temporaries


def group(k: int) -> int:
    """The planes' group size for ``k`` inputs (0: none fits)."""
    return next((g for g in (64, 32) if k % g == 0), 0)


def supports(layer) -> bool:
    # any quantized format (16-bit weights are read as they are: cpu.plain_linear); the packed
    # layout takes output rows in sixteens
    return not isinstance(layer.format, PlainFloatFormat) and group(layer.in_features) > 0 \
        and layer.out_features % 16 == 0


def copy_bytes(layer) -> int:
    """Bytes of the planes kept for ``layer``: int4 codes, a bf16 scale and offset per group."""
    n, k = layer.out_features, layer.in_features
    return PLANES * (n * k // 2 + 4 * n * (k // group(k)))


def planes_linear(layer, x: torch.Tensor) -> torch.Tensor:
    cache = layer.kernel_cache
    kernel = cache.planes
    if kernel is None:
        kernel = cache.planes = _prepare(layer)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    xb = x2.to(DTYPE)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat([xb] * PLANES, dim=1), kernel["packed"],
                                                   kernel["group"], kernel["scales_zeros"])
    return cpu.finish(layer, x, y)


@torch.no_grad()
def _prepare(layer) -> dict:
    n, k = layer.out_features, layer.in_features
    # formats with a lookup form are decoded a chunk at a time, as the slab kernel decodes them;
    # the others (int5/int6, 6-bit minifloats, partial last groups) by the format itself, whole, once
    slab = cpu_slab.prepared(layer) if cpu_slab.supports(layer) else None
    whole = layer.format.dequantize(layer.stored(), layer.shape).float() if slab is None else None
    g = group(k)
    packed, scales_zeros = [], []
    for start in range(0, n, _CHUNK):
        # the last chunk takes the remainder, so every chunk before it is a whole number of the
        # packed layout's row blocks and the chunks' packings concatenate (checked in the tests)
        if n - start < 2 * _CHUNK:
            rows = slice(start, n)
        else:
            rows = slice(start, start + _CHUNK)
        if slab is not None:
            residual = cpu_slab.decode_rows(slab, rows.start, rows.stop - rows.start, k)
        else:
            residual = whole[rows].clone()
        residual = residual.view(-1, k // g, g)
        codes, params = [], []
        for _ in range(PLANES):
            lo, hi = torch.aminmax(residual, dim=-1, keepdim=True)
            scale = ((hi - lo) / 15).to(DTYPE).float()
            scale = torch.where(scale > 0, scale, 1.0)  # a constant group: q = 8
            zero = (lo + 8 * scale).to(DTYPE).float()
            # q = (residual - zero) / scale + 8, and what the plane leaves, residual - ((q - 8) * scale
            # + zero), with the scale and offset as the kernel will read them: one pass each
            q = torch.addcmul(8 - zero / scale, residual, 1 / scale).round_().clamp_(0, 15)
            codes.append(q.to(torch.uint8).view(-1, k))
            residual -= torch.addcmul(zero - 8 * scale, q, scale)
            params.append(torch.stack([scale.reshape(-1, k // g).t(), zero.reshape(-1, k // g).t()], dim=-1))
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat(codes, dim=1).to(torch.int32), 1))
        scales_zeros.append(torch.cat(params, dim=0).to(DTYPE))  # (planes x groups, rows, 2)
        if rows.stop == n:
            break
    return {"packed": torch.cat(packed), "group": g, "scales_zeros": torch.cat(scales_zeros, dim=1).contiguous()}
