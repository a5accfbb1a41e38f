"""AWQ checkpoints in AutoAWQ's GEMM layout (``quant_method: awq``, ``version: gemm``).

Per linear: ``qweight`` int32 (in, out / 8) and ``qzeros`` int32 (groups, out / 8), 4-bit codes
packed along the outputs in AutoAWQ's interleaved order; ``scales`` fp16 (groups, out).
w = scale * (q - zero), which is ``int4-gN-zp``: the same codes, scales and zeros.
"""

from __future__ import annotations

import torch

from ampq.importers.common import Notes, as_dtype, group_name, quant_linear
from ampq.importers.packing import unpack_awq

QUANT_METHOD = "awq"


def convert(prefix: str, take, qconfig: dict, linear, notes: Notes):
    qweight = take("qweight")
    if qweight is None:
        return None
    qzeros, scales, bias = take("qzeros"), take("scales"), take("bias")
    version = str(qconfig.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r}: ampq reads AutoAWQ's GEMM layout (version: gemm)")
    bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{bits}-bit AWQ codes (AutoAWQ's GEMM layout holds 4)")
    if qzeros is None or scales is None:
        raise ValueError("qweight without qzeros and scales (AWQ without zero points is not AutoAWQ's GEMM layout)")
    out_f, in_f = linear.out_features, linear.in_features
    if qweight.shape != (in_f, -(-out_f // 8)):
        raise ValueError(f"qweight of shape {tuple(qweight.shape)} for a {out_f}x{in_f} linear")
    n_groups = scales.shape[0]
    group = int(qconfig.get("group_size", qconfig.get("q_group_size", 128)))
    group = in_f if group in (-1, 0) else group
    if scales.shape != (n_groups, out_f) or n_groups != -(-in_f // group):
        raise ValueError(f"scales of shape {tuple(scales.shape)} for {in_f} inputs in groups of {group}")
    codes = unpack_awq(qweight, out_f).t().contiguous()
    zeros = unpack_awq(qzeros, out_f).t().contiguous().to(torch.uint8)
    scale = as_dtype(scales.t().contiguous(), torch.float16, f"{prefix} scales", notes)
    return quant_linear(linear, f"int4-{group_name(group, in_f)}-zp", codes, {"scale": scale, "zero": zeros},
                        bias, "awq")
