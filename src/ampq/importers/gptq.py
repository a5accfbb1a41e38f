"""GPTQ checkpoints as AutoGPTQ and GPTQModel write them (``quant_method: gptq``).

Per linear: ``qweight`` int32 (in * bits / 32, out), codes packed along the inputs as one
little-endian bitstream (2, 3, 4 or 8 bits); ``qzeros`` int32 (groups, out * bits / 32), packed the
same way along the outputs; ``scales`` fp16 (groups, out); ``g_idx`` int32 (in,), the group of each
input. w = scale * (q - zero). ``checkpoint_format: gptq`` (v1, the default) stores zero - 1,
``gptq_v2`` the zero itself; like AutoGPTQ's loader we add the 1 back without masking it.

Symmetric checkpoints (every zero 2^(bits-1)) become ``intK-gN-sym``, the rest ``intK-gN-zp``: the
same codes, scales and zeros, so the decoded weight is the one AutoGPTQ's kernels compute. Act-order
checkpoints (desc_act: ``g_idx`` not input // group_size) keep their groups: the columns are stored
group by group and the layer permutes its inputs to match (QuantLinear's ``input_perm``).
"""

from __future__ import annotations

import torch

from ampq.importers.common import Notes, act_order, as_dtype, group_name, quant_linear
from ampq.importers.packing import unpack_int32

QUANT_METHOD = "gptq"


def convert(prefix: str, take, qconfig: dict, linear, notes: Notes):
    qweight = take("qweight")
    if qweight is None:
        return None
    qzeros, scales, g_idx, bias = take("qzeros"), take("scales"), take("g_idx"), take("bias")
    if qzeros is None or scales is None:
        raise ValueError("qweight without qzeros and scales")
    bits = int(qconfig.get("bits", 4))
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{bits}-bit GPTQ codes (AutoGPTQ's layout has 2, 3, 4 or 8)")
    out_f, in_f = linear.out_features, linear.in_features
    n_groups = scales.shape[0]
    group = int(qconfig.get("group_size", -1))
    group = in_f if group in (-1, 0) else group
    if scales.shape != (n_groups, out_f) or n_groups != -(-in_f // group):
        raise ValueError(f"scales of shape {tuple(scales.shape)} for {in_f} inputs in groups of {group}")
    perm = act_order(g_idx, group, in_f)
    codes = unpack_int32(qweight, bits, in_f, dim=0).t().contiguous()
    if perm is not None:  # act-order: store the columns group by group, permute the inputs to match
        codes = codes[:, perm].contiguous()
    zeros = unpack_int32(qzeros, bits, out_f, dim=1).t().contiguous()
    if str(qconfig.get("checkpoint_format", "gptq")).lower() != "gptq_v2":
        zeros = zeros + 1
    scale = as_dtype(scales.t().contiguous(), torch.float16, f"{prefix} scales", notes)
    gran = group_name(group, in_f)
    if bool((zeros == 1 << (bits - 1)).all()):
        return quant_linear(linear, f"int{bits}-{gran}-sym", codes, {"scale": scale}, bias, "gptq", input_perm=perm)
    return quant_linear(linear, f"int{bits}-{gran}-zp", codes, {"scale": scale, "zero": zeros.to(torch.uint8)},
                        bias, "gptq", input_perm=perm)
