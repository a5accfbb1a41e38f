"""Round to nearest: each weight to its nearest code under the format's fitted parameters."""

from __future__ import annotations

import torch

from ampq.formats import Format, Params


def rtn(weight: torch.Tensor, fmt: Format, stats=None, clip: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, Params]:
    return fmt.quantize_codes(weight.float(), clip)
