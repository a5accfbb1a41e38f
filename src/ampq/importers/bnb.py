"""bitsandbytes 4-bit checkpoints as transformers saves them (``quant_method: bitsandbytes``,
``load_in_4bit``).

Per linear: ``weight`` uint8 (n / 2, 1), two 4-bit codes a byte, the first in the high nibble,
running over the flattened (out, in) weight; ``weight.absmax`` float32 per block (or its 8-bit codes
with double quantization, plus ``weight.nested_absmax`` and the ``nested_offset``);
``weight.quant_map``, the codebook; ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``), the rest
as JSON bytes. ampq's ``nf4-bN`` / ``fp4-bN`` (``-dq``) are bnb's own formats, so the same codes and
absmax give the same weights, where the block divides a row (ampq's blocks do not cross rows).
"""

from __future__ import annotations

import json

import torch

from ampq.formats import get_format
from ampq.formats.normal_float import _dynamic_map
from ampq.importers.common import Notes, quant_linear

QUANT_METHOD = "bitsandbytes"
_STATE = "weight.quant_state.bitsandbytes__"


def convert(prefix: str, take, qconfig: dict, linear, notes: Notes):
    kind = next((k for k in ("nf4", "fp4") if take(_STATE + k, peek=True) is not None), None)
    if kind is None:
        if take("SCB", peek=True) is not None:
            raise ValueError("bitsandbytes 8-bit (LLM.int8) weights; ampq imports bnb's 4-bit checkpoints")
        return None
    state = json.loads(bytes(take(_STATE + kind).to(torch.uint8).tolist()).decode())
    weight, absmax, quant_map, bias = take("weight"), take("weight.absmax"), take("weight.quant_map"), take("bias")
    nested_absmax, nested_map = take("weight.nested_absmax"), take("weight.nested_quant_map")
    out_f, in_f = linear.out_features, linear.in_features
    block = int(state["blocksize"])
    if list(state.get("shape", [])) != [out_f, in_f]:
        raise ValueError(f"quant state shape {state.get('shape')} for a {out_f}x{in_f} linear")
    if in_f % block:
        raise ValueError(f"blocks of {block} across rows of {in_f} inputs (ampq's blocks stay inside a row)")
    double = nested_absmax is not None
    fmt_name = f"{kind}-b{block}" + ("-dq" if double else "")
    fmt = get_format(fmt_name)
    if quant_map is None or not bool((quant_map.float() == fmt.code).all()):
        raise ValueError(f"a {kind} codebook (weight.quant_map) that is not bitsandbytes' standard one")
    flat = weight.reshape(-1).to(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: out_f * in_f].to(torch.int32)
    if double:
        if nested_map is None or not bool((nested_map.float() == _dynamic_map()).all()) \
                or int(state.get("nested_blocksize", 256)) != 256:
            raise ValueError("double quantization other than bitsandbytes' default (dynamic map, blocks of 256)")
        params = {"absmax_codes": absmax.reshape(-1).to(torch.uint8),
                  "absmax_scale": nested_absmax.reshape(-1).float(),
                  "absmax_offset": torch.tensor([float(state["nested_offset"])], dtype=torch.float32)}
    else:
        params = {"absmax": absmax.reshape(out_f, in_f // block).float()}
    compute = str(qconfig.get("bnb_4bit_compute_dtype") or state.get("dtype") or "") or None
    compute = compute.removeprefix("torch.") if compute else None
    return quant_linear(linear, fmt_name, codes.reshape(out_f, in_f), params, bias, f"bnb-{kind}",
                        compute_dtype=compute)
