"""The lookup form of a format: the decoded weight is ``lut[q] * a + b`` per group, with 4- or 8-bit
codes: integers (w = q * scale + min, symmetric ones with min = -2^(k-1) * scale, so no lookup),
bitsandbytes NF4/FP4 (lut = the codebook, a = absmax), minifloats such as FP8 E4M3/E5M2 and
E2M1 (lut = every code's value, a = scale) and MXFP4 (E2M1, a = the power-of-two scale). NVFP4 has
none: its decoded weight is rounded to bf16 after the product, as compressed-tensors decodes it. The Triton kernel (GPU) and the slab kernel (CPU) both
read the stored codes through it.
"""

from __future__ import annotations

import torch

from ampq.formats.integer import IntegerFormat
from ampq.formats.microscaled import E2M1, MicroscaledFP4Format
from ampq.formats.minifloat import MinifloatFormat
from ampq.formats.normal_float import NormalFloatFormat


def has_lut_form(layer) -> bool:
    """Whether :func:`lut_form` covers ``layer``, without decoding anything."""
    fmt = layer.format
    mxfp4 = isinstance(fmt, MicroscaledFP4Format) and fmt.kind == "mxfp4"
    if not (mxfp4 or isinstance(fmt, (IntegerFormat, NormalFloatFormat, MinifloatFormat))):
        return False
    return fmt.bits in (4, 8) and not (fmt.bits == 4 and layer.in_features % 2)  # rows start on a byte


def lut_form(layer) -> dict | None:
    """The (lut, a, b) decomposition of ``layer``'s format, or None when it has none here."""
    if not has_lut_form(layer):
        return None
    fmt = layer.format
    k = layer.in_features
    stored = layer.stored()
    params = fmt.load_params({key: t for key, t in stored.items() if key != "codes"}, layer.shape)
    levels = torch.arange(1 << fmt.bits, dtype=torch.float32)
    groups = fmt.n_groups(k) if fmt.group_size != 0 else 1
    b = None
    if isinstance(fmt, IntegerFormat):
        lut, a = None, params.values["scale"].float().reshape(-1, groups)
        b = -fmt.half * a if fmt.symmetric else params.values["min"].float().reshape(-1, groups)
    elif isinstance(fmt, NormalFloatFormat):
        lut, a = fmt.code.float(), params.values["absmax"]
    elif isinstance(fmt, MinifloatFormat):
        lut, a = fmt.spec.decode(levels.to(torch.int32)).float(), params.values["scale"]
    else:
        lut, a = E2M1.decode(levels.to(torch.int32)).float(), params.values["scale"]
    a = a.float().reshape(-1, groups).expand(layer.out_features, groups).contiguous()
    b = b.expand(layer.out_features, groups).contiguous() if b is not None else None
    return {"bits": fmt.bits, "codes": stored["codes"].reshape(-1),
            "lut": lut.contiguous() if lut is not None else None,
            "a": a, "b": b, "groups": groups, "width": fmt.group_width(k)}
