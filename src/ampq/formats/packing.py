"""Bit-packing of k-bit codes (1 <= k <= 8) into a byte stream, least significant bits first.

Codes are packed without padding between them: eight k-bit codes fill exactly k bytes, so int3,
int5 and int6 cost 3, 5 and 6 bits per weight, not a byte each. Only the stream's tail is padded
to a whole byte.
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 tensor of ``packed_nbytes(codes.numel(), bits)`` bytes holding ``codes`` (1-D)."""
    codes = codes.reshape(-1)
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits == 4:
        c = codes.to(torch.uint8)
        if n % 2:
            c = torch.cat([c, c.new_zeros(1)])
        c = c.reshape(-1, 2)
        return (c[:, 0] | (c[:, 1] << 4)).contiguous()
    pad = (-n) % 8
    c = codes.to(torch.int64)
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    c = c.reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (c << shifts).sum(dim=1)  # 8 codes -> one word of 8*bits <= 64 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of a stream made by :func:`pack_bits`, as int32."""
    packed = packed.reshape(-1)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"packed stream has {packed.numel()} bytes, expected {packed_nbytes(n, bits)}")
    if bits == 8:
        return packed.to(torch.int32)
    if bits == 4:
        p = packed.to(torch.int32)
        return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)[:n]
    full = ((n + 7) // 8) * bits
    p = packed.to(torch.int64)
    if full > p.numel():
        p = torch.cat([p, p.new_zeros(full - p.numel())])
    p = p.reshape(-1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (p << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.int32)


def pack_fields(values: torch.Tensor, chunk: int, bits: int) -> torch.Tensor:
    """llama.cpp's way of filling bytes with ``bits``-bit fields (uint8, last dim): within each run of
    ``chunk * 8 / bits`` values, byte i holds value i in its lowest bits, value i + chunk in the next
    ``bits``, and so on. Q4_K's nibbles are ``chunk=32, bits=4``; Q2_K's crumbs ``chunk=32, bits=2``."""
    per = 8 // bits
    v = values.to(torch.int32).reshape(*values.shape[:-1], -1, per, chunk) & ((1 << bits) - 1)
    shifts = (torch.arange(per, dtype=torch.int32) * bits).reshape(per, 1)
    return (v << shifts).sum(dim=-2).to(torch.uint8).reshape(*values.shape[:-1], -1)


def unpack_fields(packed: torch.Tensor, chunk: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: the fields as int32, in value order."""
    per = 8 // bits
    p = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 1, chunk)
    shifts = (torch.arange(per, dtype=torch.int32) * bits).reshape(per, 1)
    return ((p >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1)
