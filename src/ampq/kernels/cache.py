"""What the kernels derive from one quantized layer's stored tensors and keep between calls.

Each :class:`ampq.nn.QuantLinear` holds one :class:`KernelCache` and replaces it with an empty one
whenever the layer moves or is cast (``.to()``, ``.cuda()``, ``.half()``: ``nn.Module._apply``):
everything here was made from the tensors where and as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class KernelCache:
    # the short path of kernels.linear: (up to how many rows, the fast CPU kernel), set by the
    # first call that chose a kernel in "auto" mode; (0, None) where the layer has none
    short_path: tuple[int, Callable | None] | None = None
    # what each CPU kernel supports for this layer, decided once
    plain_rows: int | None = None
    packed_rows: int | None = None
    slab_ok: bool | None = None
    planes_ok: bool | None = None
    triton_ok: bool | None = None
    # the repacked copies the fast kernels read instead of the stored codes
    packed: dict | None = None
    planes: dict | None = None
    slab: dict | None = None
    triton_form: dict | None = None
    triton_bias: torch.Tensor | None = None
    scaled_mm_weight: tuple[torch.Tensor, torch.Tensor] | None = None
    # whether a copy was refused for lack of free memory (decided once per layer and kernel)
    packed_refused: bool | None = None
    planes_refused: bool | None = None
    # the numbers of rows whose kernel has made all of the above it needs (kernels.prepare): a traced
    # forward (torch.compile) may only read what is here, never make it
    prepared_rows: frozenset[int] = frozenset()
