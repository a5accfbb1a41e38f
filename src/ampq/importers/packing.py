"""Reading the int32-packed codes of GPTQ, AWQ and compressed-tensors checkpoints."""

from __future__ import annotations

import torch

# AutoAWQ's GEMM layout puts output columns 0..7 of each word in nibbles 0, 2, 4, 6, 1, 3, 5, 7
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(words: torch.Tensor, bits: int, count: int, dim: int = 0) -> torch.Tensor:
    """``count`` codes (int32) along ``dim`` from int32 words that hold them as one little-endian
    bitstream along that dim: code i is bits [i * bits, (i + 1) * bits) of word 0, word 1, ...

    This is how GPTQ packs 2, 4 and 8 bits (whole codes per word) and also its 3 bits (a code may
    straddle two words), and how compressed-tensors packs along the input dimension."""
    w = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    if (count * bits + 31) // 32 > w.shape[0]:
        raise ValueError(f"{w.shape[0]} packed words along dim {dim} hold fewer than {count} {bits}-bit codes")
    # a code starting at bit b of word k ends at most 7 bits into word k + 1: read them as one 64-bit word
    pair = w | (torch.cat([w[1:], torch.zeros_like(w[:1])]) << 32)
    start = torch.arange(count, dtype=torch.int64) * bits
    shift = (start % 32).reshape(-1, *([1] * (w.dim() - 1)))
    codes = (pair[start // 32] >> shift) & ((1 << bits) - 1)
    return codes.to(torch.int32).movedim(0, dim)


def unpack_awq(words: torch.Tensor, count: int) -> torch.Tensor:
    """AutoAWQ GEMM: 4-bit codes packed along dim 1 in :data:`AWQ_ORDER`; (rows, count) int32."""
    nibbles = unpack_int32(words, 4, 8 * words.shape[1], dim=1).reshape(words.shape[0], -1, 8)
    ordered = torch.empty_like(nibbles)
    ordered[:, :, list(AWQ_ORDER)] = nibbles
    return ordered.reshape(words.shape[0], -1)[:, :count]
