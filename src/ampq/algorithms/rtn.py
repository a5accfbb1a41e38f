"""Round to nearest: each weight to its nearest code under the format's fitted parameters (fitted,
for formats that search them, against the importance of each input that calibration measured)."""

from __future__ import annotations

import torch

from ampq.formats import Format, Params


def input_importance(stats) -> torch.Tensor | None:
    """The mean of x^2 at each input (the diagonal of X^T X / n): llama.cpp's importance matrix."""
    if stats is None or getattr(stats, "xtx", None) is None or not getattr(stats, "count", 0):
        return None
    return stats.xtx.diagonal().float() / stats.count


def rtn(weight: torch.Tensor, fmt: Format, stats=None, clip: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, Params]:
    return fmt.quantize_codes(weight.float(), clip, input_importance(stats))
