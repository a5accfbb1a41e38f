"""CPU kernel for every format with a lookup form (NF4/FP4 with or without double quantization,
FP8 and the other minifloats with 4- or 8-bit codes, int8 in groups as llama.cpp's Q8_0, int4 and
int8) and for 16-bit layers (bf16/fp16 kept by a mixed plan), beyond the rows where the kernels that
keep a repacked copy pay (cpu.MAX_ROWS, cpu_planes.MAX_ROWS), and at every size where no copy may be
kept (``kernels.use("lean")``, or memory short).
The weight is decoded a slab of output rows at a time, into a float32 buffer that stays in cache,
and multiplied at once; the whole decoded weight never exists.

Decoding reads the stored codes through the format's lookup form (w = lut[q] * a + b per group,
:mod:`ampq.kernels.lut`): one ``index_select`` per slab on a table of every byte's value (for
4-bit codes, the two values a byte holds, low nibble first), then the group's a and b. On this
2-core CPU a 4096x4096 NF4 product at one row takes about 10 ms where the reference kernel takes
about 130 ms; it is still far slower than the packed int4/int8 kernels, which never decode at all.
The decoded values are the reference kernel's (float32, the same table), so results agree with it
to float32 rounding (the sums run in slabs). 16-bit weights are only widened, a slab at a time:
widening a whole 4096x4096 bf16 weight into fresh memory, as the reference does, takes 20 ms here,
a slab at a time 1.7-3.3x less in all (benchmarks/kernels.py, bf16 rows).
"""

from __future__ import annotations

import torch

from ampq.formats.plain import PlainFloatFormat
from ampq.kernels.lut import has_lut_form, lut_form

SLAB_BYTES = 2 << 20  # decoded float32 bytes per slab: inside this CPU's L2 with the codes


def supports(layer) -> bool:
    if isinstance(layer.format, PlainFloatFormat):
        return True
    # a partial last group would need its own scale layout: those few layers keep the reference
    return has_lut_form(layer) and layer.in_features % layer.format.group_width(layer.in_features) == 0


def slab_linear(layer, x: torch.Tensor, compute: torch.dtype | None = None) -> torch.Tensor:
    """``compute``: the dtype the products run in (default the activations'; the bf16 prompt kernel
    passes bf16 and gets a float32 sum back)."""
    kernel = prepared(layer)
    k, n = layer.in_features, layer.out_features
    x2 = x.reshape(-1, k)
    # the product runs in the activations' dtype, as the reference's does: a bf16 compute dtype
    # (bitsandbytes' compute_dtype) is honoured
    dtype = compute or x.dtype
    xc = x2.to(dtype)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype if compute is None else torch.float32)
    a, b = kernel["a"], kernel["b"]
    per_row = kernel["groups"] == 1  # one a (and b) per output row: applied to the product instead, one pass less
    for r in range(0, n, kernel["slab"]):
        rows = min(kernel["slab"], n - r)
        w = decode_rows(kernel, r, rows, k, per_row_scales=not per_row).to(dtype)
        if x2.shape[0] == 1 and compute is None:
            torch.mm(xc, w.t(), out=out[:, r:r + rows])
        else:
            out[:, r:r + rows] = xc @ w.t()
    if per_row and a is not None:
        out.mul_(a.reshape(1, n))
        if b is not None:
            out.add_(x2.to(out.dtype).sum(-1, keepdim=True) * b.reshape(1, n))
    if layer.bias is not None:
        out += layer.bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def prepared(layer) -> dict:
    """The slab kernel's tables for ``layer`` (made once, kept on it: a few bytes per group)."""
    cache = layer.kernel_cache
    kernel = cache.slab
    if kernel is None:
        kernel = cache.slab = _prepare(layer)
    return kernel


def decode_rows(kernel: dict, r: int, rows: int, k: int, per_row_scales: bool = True) -> torch.Tensor:
    """Float32 weight rows r .. r + rows, in the stored column order. Without ``per_row_scales`` a
    format with one scale per row is left unscaled (the slab kernel scales the product instead)."""
    codes, table, a, b = kernel["codes"], kernel["table"], kernel["a"], kernel["b"]
    if kernel["plain"]:  # 16-bit weights: widened only
        return codes[r:r + rows].to(torch.float32)
    if table is None:  # 8-bit integer codes: their own values, centred
        w = codes[r:r + rows].to(torch.float32).sub_(kernel["half"])
    else:
        index = codes[r:r + rows].reshape(-1).to(torch.int32)
        w = table.index_select(0, index).view(torch.float32).view(rows, k)
    if kernel["groups"] > 1 or per_row_scales:
        w = w.view(rows, kernel["groups"], -1).mul_(a[r:r + rows, :, None])
        if b is not None:
            w.add_(b[r:r + rows, :, None])
    return w.view(rows, k)


@torch.no_grad()
def _prepare(layer) -> dict:
    k = layer.in_features
    if isinstance(layer.format, PlainFloatFormat):
        return {"plain": True, "codes": layer.stored()["weight"].reshape(layer.out_features, k), "table": None,
                "a": None, "b": None, "groups": 1, "slab": max(1, SLAB_BYTES // (4 * k))}
    form = lut_form(layer)
    bits = form["bits"]
    a, b, half = form["a"], form["b"], 0
    if form["lut"] is None:
        # integer codes, centred: w = (q - half) * a + (b + half * a). With one (a, b) per row the
        # product runs on the raw codes, and uncentred codes would leave two large terms to cancel
        # (in bf16 that loses the result); symmetric formats then need no b at all
        half = 1 << (bits - 1)
        b = b + half * a
        b = None if not b.any() else b
        lut = torch.arange(1 << bits, dtype=torch.float32) - half
    else:
        lut = form["lut"].float()
    byte = torch.arange(256)
    if bits == 4:  # a byte holds two codes, low nibble first: its table entry is both values
        table = torch.stack([lut[byte & 15], lut[byte >> 4]], dim=-1).contiguous().view(torch.int64).reshape(-1)
    elif form["lut"] is None:
        table = None  # converting the bytes is faster than looking them up
    else:
        table = lut.contiguous().view(torch.int32)
    # index_select moves whole entries (4 or 8 bytes), which is faster than indexing a float table
    # with the codes. The codes stay the stored bytes (converted to indices a slab at a time)
    per_row = k // 2 if bits == 4 else k
    codes = form["codes"].view(torch.uint8).reshape(layer.out_features, per_row)
    return {"plain": False, "codes": codes, "table": table, "a": a, "b": b, "half": float(half),
            "groups": form["groups"], "slab": max(1, SLAB_BYTES // (4 * k))}
