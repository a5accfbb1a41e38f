"""Bias correction (the second half of ECB): quantization moves each output's mean by
E[(W - Q(W)) x] = (W - Q(W)) E[x]; adding that to the bias puts the mean back. E[x] is measured on
calibration inputs that already passed through the quantized earlier blocks."""

from __future__ import annotations

import torch


def corrected_bias(weight: torch.Tensor, dequantized: torch.Tensor, bias: torch.Tensor | None, stats) -> torch.Tensor:
    shift = (weight.double() - dequantized.double()) @ stats.mean.double()
    base = bias.double() if bias is not None else torch.zeros_like(shift)
    return (base + shift).to(bias.dtype if bias is not None else weight.dtype)
