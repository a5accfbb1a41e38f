"""Which GGUF type holds an ampq layer exactly, or which it may become with ``nearest``.

Exact (ampq's codes and fp16 parameters repacked into GGUF blocks, no re-quantization):

==================================  ======  ===================================================
ampq format                         GGUF    why it is the same number
==================================  ======  ===================================================
``int4-gN`` (asymmetric)            Q4_1    w = min + scale * q, q in [0, 15]: Q4_1's d * q + m
``int4-gN-sym``                     Q4_0    w = scale * (q - 8): Q4_0's d * (q - 8)
``int5-gN``                         Q5_1    w = min + scale * q, q in [0, 31]: Q5_1's d * q + m
``int5-gN-sym``                     Q5_0    w = scale * (q - 16): Q5_0's d * (q - 16)
``int8-gN-sym``                     Q8_0    w = scale * (q - 128): Q8_0's d * qs (int8)
``int2/3-gN`` (asymmetric)          Q4_1    the same d and m; the codes fit in 4 bits (widened)
``int2/3-gN-sym``                   Q4_0    the same d; code q - 2^(k-1) + 8 (widened)
``int6/7-gN-sym``                   Q8_0    the same d; code q - 2^(k-1) (widened)
``bf16`` / ``fp16`` layers          BF16 / F16, as stored
``q2_k`` ... ``q6_k``               Q2_K..  llama.cpp's own blocks, stored as ampq holds them
``iq4_nl``, ``iq4_xs``              IQ4_*   the same
==================================  ======  ===================================================

for N = 32 or any multiple of 32, per channel (``-ch``) or per tensor (``-t``): a GGUF block is
32 inputs with its own scale, so a larger group is written as consecutive blocks repeating its
fp16 scale (and minimum), which holds the same values. The layer's inputs must be a multiple of
32 (GGUF rows are whole blocks).

Not expressible: asymmetric 6 to 8-bit integers (Q8_0 has no minimum; Q8_1 is llama.cpp's
activation type, not a weight type), groups that are not a multiple of 32, NF4/FP4, minifloats
(FP8, E2M1, ...), AWQ input scales kept outside the weights, activation schemes (llama.cpp picks
its own), adaptive layers above their base level, layers whose inputs are not a multiple of 32.
With ``nearest=True`` they are re-quantized by gguf-py's own quantizers from the weight ampq
decodes (input scales folded in) to the nearest type gguf-py can quantize: formats of 2-4 bits
to Q4_0 or Q4_1 and of 5 bits to Q5_0 or Q5_1, per layer whichever changes the weight least (mean
squared: Q4_0 clips the larger end of a block whose extremes are equal and opposite, as NF4's
often are, and on SmolLM2 NF4 -> Q4_0 everywhere gave perplexity 858 where Q4_1 gave 26); 6-8 bits
and adaptive layers to Q8_0; inputs not a multiple of 32 to F16. gguf-py 0.19 quantizes F16, BF16,
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0 and MXFP4; the K-quants (Q2_K ... Q6_K) and the IQ
types it can only dequantize, so they are never targets here.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from ampq.exporters.driver import base_of
from ampq.formats.gguf_block import GgufBlockFormat
from ampq.formats.integer import IntegerFormat
from ampq.formats.minifloat import MinifloatFormat
from ampq.formats.normal_float import NormalFloatFormat
from ampq.formats.plain import PlainFloatFormat

BLOCK = 32  # inputs per block of every GGUF type written here


def exact_type(layer: nn.Module) -> tuple[T | None, bool, str]:
    """(GGUF type holding ``layer`` exactly, whether it is wider than the format, "") or
    (None, False, why none does)."""
    if getattr(layer, "residuals", None):
        return None, False, "adaptive layers above their base level add two formats"
    base = base_of(layer)
    fmt = base.format
    if base.input_scale is not None:
        return None, False, "AWQ input scales kept outside the weights (GGUF has no per-input scale)"
    if base.input_perm is not None:
        return None, False, "GPTQ act-order groups (GGUF blocks are of consecutive inputs)"
    if base.activation:
        return None, False, (f"{base.activation} activations (GGUF stores weights only; llama.cpp quantizes "
                             "activations its own way)")
    if isinstance(fmt, PlainFloatFormat):
        return (T.BF16 if fmt.name == "bf16" else T.F16), False, ""
    if isinstance(fmt, GgufBlockFormat):  # llama.cpp's own blocks: written as stored
        return T[fmt.name.upper()], False, ""
    if base.in_features % BLOCK:
        return None, False, (f"{base.in_features} inputs, not a multiple of {BLOCK} "
                             f"(GGUF rows are whole blocks of {BLOCK})")
    if isinstance(fmt, IntegerFormat):
        if fmt.group_size and fmt.group_size % BLOCK:
            return None, False, (f"groups of {fmt.group_size} inputs (a GGUF block is {BLOCK} inputs with one scale, "
                                 f"so only groups of a multiple of {BLOCK} carry over)")
        if fmt.symmetric:
            qtype = T.Q4_0 if fmt.bits <= 4 else T.Q5_0 if fmt.bits == 5 else T.Q8_0
            return qtype, fmt.bits not in (4, 5, 8), ""
        if fmt.zero_point:  # Q4_1/Q5_1 keep m = -scale * zero in fp16: exact only where it rounds to itself
            _, params = fmt.unpack(base.stored(), base.shape)
            m = params.values["min"]
            if not torch.equal(m.half().float(), m):
                return None, False, ("zero points whose -scale * zero is not an fp16 number (Q4_1/Q5_1 store "
                                     "an fp16 minimum)")
        if fmt.bits <= 5:
            return (T.Q4_1 if fmt.bits <= 4 else T.Q5_1), fmt.bits not in (4, 5), ""
        return None, False, (f"w = min + scale * q with {fmt.bits}-bit codes: GGUF's 8-bit Q8_0 has no minimum "
                             "(Q8_1 is llama.cpp's activation type, not a weight type)")
    if isinstance(fmt, NormalFloatFormat):
        return None, False, ("a 16-value codebook with an absmax per block, not an integer grid "
                             "(IQ4_NL's codebook differs)")
    if isinstance(fmt, MinifloatFormat):
        return None, False, f"{fmt.name}: minifloat codes (GGUF's MXFP4 needs power-of-two E8M0 scales)"
    return None, False, f"{fmt.name} has no GGUF counterpart"


def nearest_types(layer: nn.Module) -> tuple[T, ...]:
    """The GGUF types gguf-py can quantize that a layer with no exact counterpart may become: those
    of its width; the export keeps whichever re-quantizes its decoded weight with the smaller mean
    squared change."""
    base = base_of(layer)
    if base.in_features % BLOCK:
        return (T.F16,)
    if getattr(layer, "residuals", None):
        return (T.Q8_0,)
    bits = base.format.bits
    return (T.Q4_0, T.Q4_1) if bits <= 4 else (T.Q5_0, T.Q5_1) if bits == 5 else (T.Q8_0,)
