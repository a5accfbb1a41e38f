"""The contract every number format keeps.

A format turns a weight matrix ``w`` of shape (out, in) into integer codes plus per-group parameters
and back. Groups run along the input dimension (the reduction dimension of the matmul), so one group
is ``group_size`` consecutive inputs of one output row. ``group_size`` is None for one group per row
(per output channel) and 0 for one group for the whole tensor.

Parameters come back from :meth:`Format.fit` already at the precision they are stored in (an fp16
scale is rounded to fp16, a double-quantized absmax is the decoded 8-bit value), so what ``encode``
sees is exactly what ``decode`` will see after a save and a load. Algorithms (RTN, GPTQ, ...) use
``fit`` / ``encode`` / ``decode`` on column slices through :meth:`Format.expand`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ampq.formats.packing import pack_bits, packed_nbytes, unpack_bits


FP16_MAX = 65504.0


def to_fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` as the fp16 a format stores it in; ValueError (the layer cannot take the format) past fp16's range."""
    if bool((x.abs() > FP16_MAX).any()):
        raise ValueError(f"{what} exceeds the fp16 range; weights this large need a per-group or float format")
    return x.to(torch.float16)


@dataclass
class Params:
    """Per-group parameters of one quantized tensor.

    ``values``: what decoding uses, each (rows, n_groups) or (1, 1) for a whole-tensor group.
    ``stored``: what is written to disk for them (may be compressed, e.g. double-quantized absmax).
    """

    values: dict[str, torch.Tensor]
    stored: dict[str, torch.Tensor] = field(default_factory=dict)


class Format(ABC):
    name: str
    bits: int  # bits per code
    group_size: int | None  # inputs per group; None: per output channel; 0: whole tensor
    # False where one group's stored parameters depend on the others' (double quantization)
    groupwise_params: bool = True

    # ---- what a format implements -------------------------------------------------------------
    @abstractmethod
    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> Params:
        """Per-group parameters for ``w`` (float32, (out, in)); ``clip`` shrinks the range
        (a ratio in (0, 1], scalar or one per group)."""

    @abstractmethod
    def encode(self, w: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes (int32, same shape as ``w``) for ``w`` given parameter values broadcastable to it."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 weights from codes and broadcastable parameter values."""

    @abstractmethod
    def load_params(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> Params:
        """Inverse of ``Params.stored``: rebuild the parameter values from what was saved."""

    @abstractmethod
    def param_nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes that the stored parameters of a (out, in) tensor take."""

    def fit_importance(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0,
                       importance: torch.Tensor | None = None) -> Params:
        """:meth:`fit`, weighting each input's error by ``importance`` (one non-negative value per input
        column: the mean of x^2 calibration saw there, llama.cpp's importance matrix). Formats that
        search their parameters (the GGUF K-quants) use it; the others fit as :meth:`fit` does."""
        return self.fit(w, clip)

    # ---- shared machinery -----------------------------------------------------------------------
    def n_groups(self, in_features: int) -> int:
        if not self.group_size:
            return 1
        return math.ceil(in_features / self.group_size)

    def group_width(self, in_features: int) -> int:
        return self.group_size if self.group_size else in_features

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """View ``w`` (out, in) as (out, n_groups, width), padding a partial last group by
        repeating the row's last input, which leaves every group statistic unchanged."""
        out, cols = w.shape
        if self.group_size == 0:
            return w.reshape(1, 1, -1)
        width = self.group_width(cols)
        pad = self.n_groups(cols) * width - cols
        if pad:
            w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
        return w.reshape(out, -1, width)

    def group_absmax(self, w: torch.Tensor, clip: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each group's absmax, the clip ratios shaped like it) for ``w``; ValueError on inf/NaN."""
        g = self.grouped(w.float())
        clip = torch.as_tensor(clip, dtype=torch.float32)
        if clip.dim() == 2:
            clip = clip.reshape(g.shape[0], g.shape[1])
        absmax = g.abs().amax(dim=2)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"{self.name}: weights hold inf or NaN")
        return absmax, clip

    def expand(self, values: dict[str, torch.Tensor], shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Parameter values repeated to one per weight, (out, in), for column-wise algorithms."""
        out, cols = shape
        width = self.group_width(cols)
        expanded = {}
        for key, v in values.items():
            if self.group_size == 0:
                expanded[key] = v.reshape(1, 1).expand(out, cols)
            else:
                expanded[key] = v.repeat_interleave(width, dim=1)[:, :cols].expand(out, cols)
        return expanded

    def _apply_grouped(self, fn, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        out, cols = x.shape
        if self.group_size == 0:
            return fn(x, {k: v.reshape(1, 1) for k, v in values.items()})
        grouped = self.grouped(x)
        result = fn(grouped, {k: v.reshape(out, -1, 1) for k, v in values.items()}).reshape(out, -1)
        return result[:, :cols] if result.shape[1] != cols else result

    def quantize_codes(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0,
                       importance: torch.Tensor | None = None) -> tuple[torch.Tensor, Params]:
        w = w.detach().float()
        params = self.fit_importance(w, clip, importance)
        codes = self._apply_grouped(self.encode, w, params.values)
        return codes, params

    def fake_quantize(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``w`` after a round trip through the format, float32."""
        codes, params = self.quantize_codes(w, clip)
        return self.dequantize_codes(codes, params.values)

    def dequantize_codes(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._apply_grouped(self.decode, codes, values)

    def shared_over(self, weights: list[torch.Tensor]) -> "Format":
        """The format to fit each of ``weights`` with when engines fuse them into one layer (q/k/v,
        gate/up): itself, unless a parameter spans the whole tensor (NVFP4's global scale), which
        the fused layer holds once."""
        return self

    def join_params(self, parts: list[Params]) -> Params:
        """Parameters of consecutive column slices, fitted one by one, as one set."""
        if not self.groupwise_params or not self.group_size:
            raise ValueError(f"{self.name} has no independent per-group parameters to join")
        return Params({k: torch.cat([p.values[k] for p in parts], dim=1) for k in parts[0].values},
                      {k: torch.cat([p.stored[k] for p in parts], dim=1) for k in parts[0].stored})

    # ---- storage ----------------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
        return {"codes": pack_bits(codes.reshape(-1), self.bits), **params.stored}

    def unpack(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, Params]:
        n = shape[0] * shape[1]
        codes = unpack_bits(stored["codes"], self.bits, n).reshape(shape)
        params = self.load_params({k: v for k, v in stored.items() if k != "codes"}, shape)
        return codes, params

    def quantize(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
        """Everything stored for ``w``: packed codes plus parameters."""
        codes, params = self.quantize_codes(w, clip)
        return self.pack(codes, params)

    def dequantize(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        codes, params = self.unpack(stored, shape)
        return self.dequantize_codes(codes, params.values)

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Exact bytes stored for a (out, in) weight: codes, scales, zeros, everything."""
        return packed_nbytes(shape[0] * shape[1], self.bits) + self.param_nbytes(shape)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        return 8 * self.nbytes(shape) / (shape[0] * shape[1])

    def __repr__(self) -> str:
        return f"Format({self.name!r})"


_device_copies: dict = {}


def constant_on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small constant table on ``device``, copied once (decoding on a GPU indexes it with GPU
    codes, and a copy per call would also break CUDA graph capture)."""
    if table.device == device:
        return table
    key = (id(table), device)
    if key not in _device_copies:
        _device_copies[key] = (table, table.to(device))  # the original kept alive so its id stays unique
    return _device_copies[key][1]
