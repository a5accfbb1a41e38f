"""CPU kernels for decoding and short prompts: torch's packed int4 (``_weight_int4pack_mm_for_cpu``) and int8
(``_weight_int8pack_mm``) matmuls, run with bf16 activations. int2 and int3 codes run in the int4
kernel: w = scale * (q - half) + zero is the same weight as the int4 code q + 8 - half, exactly.

At a few rows (decoding) the reference kernel spends its time decoding the whole weight, 30-100x
the matmul itself on this 2-core CPU; the packed kernels read the codes directly. They are fast
only with bf16 inputs (with fp32 inputs they were 2.5-5x slower than a dense fp32 matmul here), so
the activations are cast to bf16 and the output back: a relative error of about 2^-8 on top of the
format's own, checked against the reference kernel in tests/test_kernels_cpu.py.

The packed tensors are derived from the stored codes at first use and kept on the layer, next to
(not instead of) what the checkpoint stores: 0.5 (int4) or 1 (int8) extra bytes per weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ampq.formats.integer import IntegerFormat
from ampq.formats.plain import PlainFloatFormat

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the packed int4 kernel takes
DTYPE = torch.bfloat16
# Up to how many rows the packed kernels run; above, the slab kernel (cpu_slab.py), which decodes
# each weight once per call, is as fast or faster: the crossovers benchmarks/kernel_speed.py measures
# (its "slab ms" column; docs/kernels.md). int2/int3 have no slab kernel, and the packed one beat
# decoding the weight first at every size tried.
MAX_ROWS = {2: 1 << 62, 3: 1 << 62, 4: 128, 8: 64}


# 16-bit layers (kept by a mixed plan) multiply their stored weight directly up to these rows: for a
# row or two reading half the bytes wins; beyond, widening it by slabs (cpu_slab.py) does, where the
# CPU has no 16-bit arithmetic
PLAIN_ROWS = {torch.bfloat16: 2, torch.float16: 1}


def plain_rows(layer) -> int:
    return PLAIN_ROWS[layer.format.dtype] if isinstance(layer.format, PlainFloatFormat) else 0


def plain_linear(layer, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight.view(layer.out_features, layer.in_features)
    return finish(layer, x, F.linear(x.to(w.dtype), w))


def copy_bytes(layer) -> int:
    """Bytes of the packed copy this kernel keeps for ``layer``."""
    n, k = layer.out_features, layer.in_features
    if layer.format.bits <= 4:
        return n * k // 2 + 4 * n * (k // layer.format.group_size)  # int4 codes, bf16 scale and zero
    return n * k + 10 * n  # int8 codes; bf16 ones, float32 scales and offsets


def max_rows(layer) -> int:
    """Rows up to which ``layer`` runs the packed kernel (0: never)."""
    return MAX_ROWS[layer.format.bits] if supports(layer) else 0


def supports(layer) -> bool:
    fmt = layer.format
    if not isinstance(fmt, IntegerFormat):
        return False
    if fmt.bits <= 4:
        # torch's int4 packing takes whole tiles of 16 outputs (DeepSeek's 40-wide kv_a_proj has not)
        return fmt.group_size in INT4_GROUPS and layer.in_features % fmt.group_size == 0 \
            and layer.out_features % 16 == 0
    return fmt.bits == 8 and fmt.group_size is None  # per output channel


def packed_linear(layer, x: torch.Tensor) -> torch.Tensor:
    cache = layer.kernel_cache
    kernel = cache.packed
    if kernel is None:
        kernel = cache.packed = _prepare(layer)
    # each op below costs 1-3 us, as much as the matmul of a small layer at one row: none is spent
    # on a reshape or cast that changes nothing
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    xb = x2.to(DTYPE)
    if kernel["bits"] <= 4:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, kernel["packed"], kernel["group"], kernel["scales_zeros"])
    else:
        # the float32 scales (and offsets) are applied outside the bf16 kernel, in as few ops as
        # possible, in float32: the kernel's bf16 scales would add a rounding shared by a whole row
        y = torch.ops.aten._weight_int8pack_mm(xb, kernel["codes"], kernel["ones"])
        if kernel["offset"] is None:
            y = y * kernel["scale"]
        else:  # asymmetric: w = scale * (q - 128) + offset, per output row
            y = torch.addcmul(x2.sum(-1, keepdim=True) * kernel["offset"], y, kernel["scale"])
    return finish(layer, x, y)


def finish(layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A kernel's (rows, out) product ``y`` as the layer's output for ``x``: its dtype, the bias,
    its leading dimensions."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], layer.out_features)


@torch.no_grad()
def _prepare(layer) -> dict:
    fmt = layer.format
    codes, params = fmt.unpack(layer.stored(), layer.shape)
    scale = params.values["scale"].float()
    # both formats' codes are unsigned, centred on 2^(bits-1): w = scale * (q - half) + zero
    zero = params.values["min"].float() + fmt.half * scale if not fmt.symmetric else torch.zeros_like(scale)
    if fmt.bits <= 4:
        int4_codes = codes.to(torch.int32) + (8 - fmt.half)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_codes.contiguous(), 1)
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(DTYPE).contiguous()  # (groups, out, 2)
        return {"bits": fmt.bits, "packed": packed, "group": fmt.group_size, "scales_zeros": scales_zeros}
    centred = (codes.to(torch.int16) - fmt.half).to(torch.int8).contiguous()
    return {"bits": 8, "codes": centred, "ones": torch.ones(layer.out_features, dtype=DTYPE),
            "scale": scale.reshape(1, -1), "offset": None if fmt.symmetric else zero.reshape(1, -1)}
