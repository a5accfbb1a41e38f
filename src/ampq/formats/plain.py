"""16-bit floats (``bf16``, ``fp16``) as a format: the ceiling of a mixed-precision allocation, so
that "keep this layer in 16 bits" is a choice like any other, stored and counted the same way."""

from __future__ import annotations

import torch

from ampq.formats.base import Format, Params

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PlainFloatFormat(Format):
    bits = 16
    group_size = 0

    def __init__(self, name: str):
        self.name, self.dtype = name, _DTYPES[name]

    def fit(self, w: torch.Tensor, clip: float | torch.Tensor = 1.0) -> Params:
        return Params({}, {})

    def encode(self, w: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.dtype == torch.float16 and bool((w.abs() > 65504).any()):
            raise ValueError("weights exceed the fp16 range; use bf16")
        return w.to(self.dtype).view(torch.int16).to(torch.int32)

    def decode(self, codes: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return codes.to(torch.int16).view(self.dtype).float()

    def load_params(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> Params:
        return Params({}, {})

    def param_nbytes(self, shape: tuple[int, int]) -> int:
        return 0

    def pack(self, codes: torch.Tensor, params: Params) -> dict[str, torch.Tensor]:
        return {"weight": codes.to(torch.int16).view(self.dtype).contiguous()}

    def unpack(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> tuple[torch.Tensor, Params]:
        return stored["weight"].reshape(shape).view(torch.int16).to(torch.int32), Params({}, {})

    def dequantize(self, stored: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        return stored["weight"].reshape(shape).float()

    def nbytes(self, shape: tuple[int, int]) -> int:
        return 2 * shape[0] * shape[1]
