"""The tensors of a GGUF file as numpy data: ampq's codes and fp16 parameters repacked into
llama.cpp's blocks (no re-quantization; byte layouts as ggml-common.h defines them), tensors
written as stored, weights re-quantized by gguf-py, and llama.cpp's q/k row order."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from ampq.exporters.gguf.qtypes import BLOCK
from ampq.formats.gguf_block import GgufBlockFormat


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """(..., 2) little-endian fp16 bytes of ``x`` (float32 values that came from fp16: exact)."""
    return np.ascontiguousarray(x.numpy().astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(c: torch.Tensor) -> np.ndarray:
    """(out, blocks, 16): element j in the low nibble of byte j, element j + 16 in its high nibble."""
    c = c.to(torch.uint8)
    return ((c[..., :16] & 0xF) | ((c[..., 16:] & 0xF) << 4)).numpy()


def _high_bits(c: torch.Tensor) -> np.ndarray:
    """(out, blocks, 4): the 5th bit of element j as bit j of a little-endian uint32 (Q5_0 / Q5_1's qh)."""
    bits = ((c.to(torch.int64) >> 4) & 1) << torch.arange(BLOCK, dtype=torch.int64)
    word = bits.sum(dim=-1, keepdim=True)
    return ((word >> (8 * torch.arange(4, dtype=torch.int64))) & 0xFF).to(torch.uint8).numpy()


def exact_blocks(layer: nn.Module, qtype: T) -> np.ndarray:
    """(out, bytes per row) uint8: ``layer``'s codes and fp16 parameters as GGUF blocks of ``qtype``."""
    fmt = layer.format
    out, cols = layer.shape
    if isinstance(fmt, GgufBlockFormat):  # ampq stores these as llama.cpp's blocks already
        return np.ascontiguousarray(layer.stored()["blocks"].reshape(out, -1).numpy())
    codes, params = fmt.unpack(layer.stored(), layer.shape)
    per_block = {k: v[:, ::BLOCK].contiguous() for k, v in fmt.expand(params.values, layer.shape).items()}
    nb = cols // BLOCK
    c = codes.reshape(out, nb, BLOCK)
    d = _f16_bytes(per_block["scale"])
    if qtype in (T.Q4_1, T.Q5_1):  # asymmetric: the same codes, d = scale, m = min
        parts = [d, _f16_bytes(per_block["min"])]
        parts += [_high_bits(c)] if qtype == T.Q5_1 else []
        parts.append(_nibbles(c))
    elif qtype in (T.Q4_0, T.Q5_0):  # symmetric: the same signed code re-centred on 8 or 16
        c = c - fmt.half + (8 if qtype == T.Q4_0 else 16)
        parts = [d] + ([_high_bits(c)] if qtype == T.Q5_0 else []) + [_nibbles(c)]
    elif qtype == T.Q8_0:  # symmetric: the signed code itself
        parts = [d, (c - fmt.half).to(torch.int8).numpy().view(np.uint8)]
    else:
        raise AssertionError(qtype)
    blocks = np.concatenate(parts, axis=-1)
    assert blocks.shape[-1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(blocks.reshape(out, -1))


def plain_array(t: torch.Tensor) -> tuple[np.ndarray, T]:
    """A float tensor as GGUF F32 / F16 / BF16 data, as stored."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint8).numpy().reshape(*t.shape[:-1], -1), T.BF16
    if t.dtype == torch.float16:
        return t.numpy(), T.F16
    return t.float().numpy(), T.F32


def requantize(w: np.ndarray, candidates: tuple[T, ...]) -> tuple[np.ndarray, np.ndarray, T]:
    """(data to write, what it decodes to, its type) for ``w`` re-quantized by gguf-py to whichever
    of ``candidates`` changes it least (mean squared; the first on a tie). F16 becomes F32 where a
    weight exceeds fp16's range."""
    best = None
    for qtype in candidates:
        if qtype == T.F16 and float(np.abs(w).max(initial=0.0)) > 65504:
            qtype = T.F32
        data = gguf.quants.quantize(w, qtype)
        decoded = gguf.quants.dequantize(data, qtype).reshape(w.shape)
        error = float(np.mean(np.square(decoded.astype(np.float64) - w)))
        if best is None or error < best[0]:
            best = (error, data, decoded, qtype)
    return best[1], best[2], best[3]


def permute(w, n_head: int):
    """llama.cpp's q/k row order for the llama architecture (``LlamaModel.permute`` in its converter):
    each head's rotary halves interleaved. Works on weights, biases and rows of blocks alike."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
