"""What llama.cpp's block types (the K-quants, IQ4_NL, IQ4_XS) share as ampq formats.

Each row is cut into blocks of ``block`` inputs (256 for the K-quants and IQ4_XS, 32 for IQ4_NL);
a block is ``type_size`` bytes laid out as ggml-common.h defines it, and that is what ampq stores:
one uint8 tensor ``blocks`` of (rows, blocks per row * type_size), so the bytes per weight are
llama.cpp's exactly and the GGUF export writes the tensor as it is. Inside a block, sub-blocks of
``group_size`` inputs each decode as ``scale * q + min`` (``min`` absent for the symmetric types)
with float32 ``scale`` and ``min`` products of the block's fp16 factors and small integer scales,
computed as llama.cpp's ``dequantize_row_*`` computes them, so decoding is bit for bit.

A subclass says how to search the parameters (:meth:`_search`, weighted by the importance of each
input), how its parameter parts decode (:meth:`_values`), and its byte layout (:meth:`_to_blocks`,
:meth:`_from_blocks`). Codes are chosen by :meth:`encode`, nearest to the weight under the final
(quantized) parameters, which is optimal for any per-weight error once the parameters are fixed.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from ampq.formats.base import Format, Params, to_fp16  # noqa: F401  (the block formats' fp16 fields)


class GgufBlockFormat(Format):
    block: int  # inputs per block
    type_size: int  # bytes per block
    groupwise_params = False  # a block's fp16 factors span its sub-blocks

    def __init__(self, name: str):
        self.name = name

    # ---- what a type implements -------------------------------------------------------------------
    @abstractmethod
    def _search(self, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored parameter parts for blocks ``x`` (n, block) float64 under per-weight error
        ``weights`` (n, block), each (n, ...) per block."""

    @abstractmethod
    def _values(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decoding values, each (n, sub-blocks) float32, from the parts of n blocks."""

    @abstractmethod
    def _weights(self, x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """Per-weight error weights of blocks ``x`` (n, block), from the importance of their inputs
        (n, block) where calibration gave one, as llama.cpp's quantize_row_*_impl makes them."""

    @abstractmethod
    def _to_blocks(self, codes: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, type_size) uint8 from codes (n, block) and the parts of n blocks."""

    @abstractmethod
    def _from_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Inverse of :meth:`_to_blocks`."""

    # ---- the Format contract ----------------------------------------------------------------------
    def _check(self, shape: tuple[int, int]) -> None:
        if shape[1] % self.block:
            raise ValueError(f"{self.name} needs inputs in whole blocks of {self.block} (llama.cpp's rows are "
                             f"whole blocks); this weight has {shape[1]}")

    def _blocks_of(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.block)

    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> Params:
        return self.fit_importance(w, clip, None)

    def fit_importance(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0,
                       importance: torch.Tensor | None = None) -> Params:
        rows, cols = w.shape
        self._check((rows, cols))
        x = w.double()
        clip = torch.as_tensor(clip, dtype=torch.float64)
        if clip.numel() > 1 or float(clip) != 1.0:  # shrink each sub-block's range about its centre
            g = self.grouped(x)
            c = clip.reshape(rows, -1, 1) if clip.dim() == 2 else clip
            lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
            mid, half = (lo + hi) / 2, (hi - lo) / 2 * c
            x = torch.minimum(torch.maximum(g, mid - half), mid + half).reshape(rows, cols)
        imp = None
        if importance is not None:
            imp = importance.double().reshape(1, cols).expand(rows, cols)
            imp = self._blocks_of(imp)
        xb = self._blocks_of(x)
        parts = self._search(xb, self._weights(xb, imp))
        nb = cols // self.block
        stored = {k: v.reshape(rows, nb, *v.shape[1:]) for k, v in parts.items()}
        return Params(self._flat_values(parts, rows), stored)

    def _flat_values(self, parts: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        return {k: v.reshape(rows, -1).float() for k, v in self._values(parts).items()}

    def load_params(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> Params:
        _, parts = self._unpack_blocks(stored["blocks"], shape)
        return Params(self._flat_values(parts, shape[0]), {k: v.reshape(shape[0], -1, *v.shape[1:]) for k, v in parts.items()})

    def pack(self, codes: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
        rows, cols = codes.shape
        parts = {k: v.reshape(-1, *v.shape[2:]) for k, v in params.stored.items()}
        blocks = self._to_blocks(self._blocks_of(codes), parts)
        assert blocks.shape[-1] == self.type_size
        return {"blocks": blocks.reshape(rows, -1).contiguous()}

    def _unpack_blocks(self, blocks: torch.Tensor, shape: tuple[int, int]):
        rows, cols = shape
        self._check(shape)
        expected = rows * cols // self.block * self.type_size
        if blocks.numel() != expected:
            raise ValueError(f"{self.name} blocks hold {blocks.numel()} bytes, expected {expected}")
        codes, parts = self._from_blocks(blocks.reshape(-1, self.type_size).to(torch.uint8))
        return codes.reshape(rows, cols), parts

    def unpack(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, Params]:
        codes, parts = self._unpack_blocks(stored["blocks"], shape)
        return codes, Params(self._flat_values(parts, shape[0]),
                             {k: v.reshape(shape[0], -1, *v.shape[1:]) for k, v in parts.items()})

    def nbytes(self, shape: tuple[int, int]) -> int:
        self._check(shape)
        return shape[0] * shape[1] // self.block * self.type_size

    def param_nbytes(self, shape: tuple[int, int]) -> int:
        return self.nbytes(shape) - shape[0] * shape[1] * self.bits // 8
