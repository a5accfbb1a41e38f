"""Kernels that quantize the activations too (W8A8), chosen by ``QuantLinear.activation``.

Modes (the string in ``layer.activation``):

``int8-outlier:T`` (``int8-outlier`` alone means T = 6.0)
    LLM.int8 (Dettmers et al. 2022) as bitsandbytes 0.50 computes it in
    ``bnb.nn.Linear8bitLt(has_fp16_weights=False, threshold=T)`` at inference (``MatMul8bitLt`` with
    the default / CPU ops ``int8_vectorwise_quant`` and ``int8_mixed_scaled_mm``). Weights must be
    ``int8-ch-sym``: code c in [-128, 127] (stored as c + 128) times a per-output-row step s_w.
    For an input x of n tokens (leading dims flattened):

    1. x16 = x cast to float16 (bnb quantizes and finds outliers on the fp16 copy, whatever x's dtype).
    2. Outliers are the entries with |x16| >= T (``>=``, as bnb); an outlier *column* is an input
       feature holding an outlier in any token of this call. T = 0 turns the decomposition off, as
       in bnb (its ``threshold > 0`` test); T = inf flags only infinite entries.
    3. The outlier entries are zeroed and each token's scale is a_i = max_k |x16_ik| over what is
       left. Note: a token's sub-threshold entries that lie in outlier columns still count towards
       a_i (bnb zeroes whole columns only after the scale is taken).
    4. Codes q_ik = round(x16_ik * (127 / a_i)) (float32 product, half to even), with every outlier
       column then set to 0. A token with a_i = 0 gets zero codes (bnb would compute 0 * inf there).
    5. Int8 part: sum_k q_ik c_jk, exact (integer semantics: float32 chunks small enough to be exact,
       summed in float64), times a_i / 127 * s_w[j].
    6. Outlier part: x[:, cols] @ W_deq[:, cols]^T in float32, with x at its *original* precision
       (not the fp16 copy) and W_deq the *dequantized int8* weights (bnb has no float weights left
       once ``has_fp16_weights=False``).
    7. y = (int8 part + outlier part) cast to x's dtype, then the bias is added in x's dtype.

    Where this differs from bnb, all at rounding level: bnb scales the int32 sums by the constant
    ``6.200124e-05`` in its default (CPU) op, which is not 1/127^2 = 6.2000124e-05 (a relative
    error of 1.8e-5); we use the exact value. bnb converts the int8 part (with bias) to x's dtype
    before adding the outlier part in x's dtype; we add both in float32 and round once, then add
    the bias. Its weight: SCB = absmax(fp16(w)) in float32, CB = round(fp16(w) * (127 / SCB)),
    while ampq's ``int8-ch-sym`` keeps s_w = fp16(absmax(w) / 127), so the two quantizers of the
    same float weights give steps that differ by up to 2^-10 relative (each side rounds once to
    fp16: ampq the step, bnb the weights and so their absmax) and codes that differ by at most one. Fed the same codes (bnb's SCB = 127 * s_w, exact in float32) the outputs agree to
    those roundings; where every row's absmax/127 is a power of two and w is fp16, the codes and
    scales are identical (tests/test_activation.py checks both).

``fp8-e4m3-token`` / ``fp8-e5m2-token``
    W8A8 with dynamic per-token activation scaling: s_i = absmax(x_i) / max_finite,
    xq_i = round_fp8(x_i / s_i) (ampq's MinifloatSpec rounding, saturating, half to even),
    y = (xq * s) @ W_deq^T in float32, W_deq the fp8 weights decoded (an 8-bit minifloat format
    with one scale per output channel or per tensor: ``fp8-e4m3-ch``, ``fp8-e5m2-ch``,
    ``fp8-e4m3``, ``fp8-e5m2``). An all-zero token has s_i = 0 and gives 0, not NaN.
    This is the reference semantics; on a GPU with fp8 tensor cores the same product runs as
    ``torch._scaled_mm(xq, codes_w.T, scale_a=s, scale_b=s_w)`` (``fp8_scaled_mm.py``, bf16 output).

Bias: added last, in the activation dtype. Output dtype: x's dtype.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache

import torch

from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.formats.integer import IntegerFormat
from ampq.formats.minifloat import MinifloatFormat, MinifloatSpec
from ampq.kernels.fp8_scaled_mm import scaled_mm_linear

DEFAULT_THRESHOLD = 6.0
# Written the way a user types them; int8-outlier takes a threshold after a colon.
VALID_MODES = ("int8-outlier:T", "fp8-e4m3-token", "fp8-e5m2-token")
_FP8_TOKEN = {"fp8-e4m3-token": (4, 3), "fp8-e5m2-token": (5, 2)}

# Partial sums of int8 x int8 products (|c| <= 128 for weights, |q| <= 127 for activations) stay
# integers below 2^24, hence exact in float32, for up to this many terms.
_EXACT_F32_TERMS = (1 << 24) // (128 * 127)


class ActivationError(AmpqError, ValueError):
    """A bad ``activation`` mode, or one that the layer's weight format cannot serve."""


@dataclass(frozen=True)
class ActivationMode:
    name: str  # as given
    kind: str  # "int8-outlier" or "fp8-token"
    threshold: float | None = None  # int8-outlier only
    spec: MinifloatSpec | None = None  # fp8-token only: the activation's element format


def _valid() -> str:
    return ("valid activation modes: 'int8-outlier:T' (LLM.int8, T the outlier threshold, "
            "e.g. 'int8-outlier:6.0'; 'int8-outlier' alone means T=6.0), 'fp8-e4m3-token', 'fp8-e5m2-token'")


@lru_cache(maxsize=None)
def parse_activation(mode: str) -> ActivationMode:
    """The mode named by ``mode``; anything else raises :class:`ActivationError` (a ValueError)."""
    if not isinstance(mode, str):
        raise ActivationError(f"activation mode must be a string, not {type(mode).__name__}; {_valid()}")
    text = mode.strip().lower()
    name, sep, arg = text.partition(":")
    if name == "int8-outlier":
        if not sep:
            return ActivationMode(mode, "int8-outlier", DEFAULT_THRESHOLD)
        try:
            threshold = float(arg)
        except ValueError:
            raise ActivationError(f"activation {mode!r}: the threshold after ':' must be a number, "
                                  f"e.g. 'int8-outlier:6.0'") from None
        if not threshold >= 0:  # NaN too
            raise ActivationError(f"activation {mode!r}: the threshold must be >= 0 "
                                  f"(0 turns the outlier decomposition off)")
        return ActivationMode(mode, "int8-outlier", threshold)
    if name in _FP8_TOKEN:
        if sep:
            raise ActivationError(f"activation {mode!r}: {name} takes no argument after ':'")
        return ActivationMode(mode, "fp8-token", spec=MinifloatSpec(*_FP8_TOKEN[name]))
    close = difflib.get_close_matches(name, ["int8-outlier", *_FP8_TOKEN], n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ActivationError(f"unknown activation mode {mode!r}.{hint} {_valid()}")


def check_format(mode: ActivationMode, format_name: str) -> None:
    """Raise :class:`ActivationError` where weights stored as ``format_name`` cannot serve ``mode``."""
    fmt = get_format(format_name)
    if mode.kind == "int8-outlier":
        if not (isinstance(fmt, IntegerFormat) and fmt.bits == 8 and fmt.symmetric and fmt.group_size is None):
            raise ActivationError(
                f"activation {mode.name!r} (LLM.int8) needs weights stored as int8-ch-sym "
                f"(symmetric int8, one scale per output channel), not {format_name!r}")
        return
    if not (isinstance(fmt, MinifloatFormat) and fmt.bits == 8 and fmt.group_size in (None, 0)):
        raise ActivationError(
            f"activation {mode.name!r} (W8A8) needs fp8 weights with one scale per output channel or "
            f"per tensor (fp8-e4m3-ch, fp8-e5m2-ch, fp8-e4m3, fp8-e5m2), not {format_name!r}")


def activation_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with the activations quantized as ``layer.activation`` says (see module doc)."""
    mode = parse_activation(layer.activation)
    check_format(mode, layer.format_name)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if mode.kind == "int8-outlier":
        cb, step = int8_weight(layer)
        y = int8_outlier_matmul(x2, cb, step, mode.threshold)
    else:
        y = None
        if x2.is_cuda:
            y = scaled_mm_linear(layer, x2, mode.spec)
        if y is None:
            y = _fp8_token_matmul(x2, layer.dequantize(torch.float32), mode.spec)
    y = y.to(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y.reshape(*lead, layer.out_features)


# ---- LLM.int8 ------------------------------------------------------------------------------------
def int8_weight(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``int8-ch-sym`` layer's weight as bitsandbytes holds it: int8 codes CB (out, in) and the
    float32 step per output row (w = CB * step; bnb's SCB is 127 * step)."""
    codes, params = layer.format.unpack(layer.stored(), layer.shape)
    half = layer.format.half
    cb = (codes - half).to(torch.int8)
    step = params.values["scale"].reshape(-1).float()
    return cb, step


def int8_quantize_rows(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``int8_vectorwise_quant`` on ``x`` (2-D, any float dtype, cast to fp16 first).

    Returns int8 codes (outlier columns zeroed), the float32 absmax per row (a_i; the step is
    a_i / 127) and the outlier column indices (int64, ascending; empty where none or threshold 0).
    """
    x16 = x.to(torch.float16)
    if threshold > 0:
        outliers = x16.abs() >= threshold
        cols = outliers.any(dim=0).nonzero().reshape(-1)
        x16 = x16.masked_fill(outliers, 0)
    else:
        cols = torch.empty(0, dtype=torch.int64, device=x.device)
    absmax = x16.abs().amax(dim=1).float()
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = torch.round(x16.float() * inv.unsqueeze(1))
    if cols.numel():
        q[:, cols] = 0
    return q.to(torch.int8), absmax, cols


def int8_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for int8 ``a`` (m, k) and ``b`` (n, k), exactly (int32 semantics), as float64.

    float32 matmuls over chunks of at most ``_EXACT_F32_TERMS`` columns are exact whatever their
    summation order (every partial sum is an integer below 2^24); the chunks add up in float64.
    """
    k = a.shape[1]
    out = None
    for start in range(0, max(k, 1), _EXACT_F32_TERMS):
        part = a[:, start:start + _EXACT_F32_TERMS].float() @ b[:, start:start + _EXACT_F32_TERMS].float().T
        out = part.double() if out is None else out + part.double()
    return out


def int8_outlier_matmul(x: torch.Tensor, cb: torch.Tensor, step: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8 of 2-D ``x`` against int8 weights ``cb`` (out, in) with per-row ``step``; float32, no bias."""
    q, absmax, cols = int8_quantize_rows(x, threshold)
    acc = int8_matmul_exact(q, cb)
    y = (acc * ((absmax.double() / 127.0).unsqueeze(1) * step.double().unsqueeze(0))).float()
    if cols.numel():
        w_out = cb[:, cols].float() * step.unsqueeze(1)
        y = y + x[:, cols].float() @ w_out.T
    return y


# ---- FP8 W8A8, per-token scales --------------------------------------------------------------------
def fp8_quantize_tokens(x: torch.Tensor, spec: MinifloatSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (token) fp8 quantization of 2-D ``x``: values on the fp8 grid (float32) and the
    float32 scale per row (n, 1); x ~= values * scale. A zero row gets scale 0 and zero values."""
    x = x.float()
    scale = x.abs().amax(dim=1, keepdim=True) / spec.max_finite
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = torch.where(scale > 0, x / safe, torch.zeros_like(x))
    return spec.round(scaled), scale


def _fp8_token_matmul(x: torch.Tensor, w: torch.Tensor, spec: MinifloatSpec) -> torch.Tensor:
    """(xq * s) @ w^T in float32 for 2-D ``x`` and decoded fp8 weights ``w`` (out, in); no bias.
    The reference for the GPU path in fp8_scaled_mm.py."""
    xq, scale = fp8_quantize_tokens(x, spec)
    return (xq * scale) @ w.float().T


__all__ = ["ActivationError", "ActivationMode", "DEFAULT_THRESHOLD", "VALID_MODES", "activation_linear",
           "check_format", "fp8_quantize_tokens", "int8_matmul_exact", "int8_outlier_matmul",
           "int8_quantize_rows", "int8_weight", "parse_activation"]

