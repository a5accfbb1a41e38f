"""Clip search (the first half of ECB): per group, the clipping ratio of the format's range that
minimises the activation-weighted output error of that group, (W - Q(W))_g H_gg (W - Q(W))_g^T,
with H the calibration Hessian. Clipping trades a larger error on rare outliers for a finer grid on
everything else; the Hessian says which inputs matter."""

from __future__ import annotations

import torch

from ampq.formats import Format

GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 down to 0.5


def _diagonal_blocks(h: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    n = groups * width
    padded = torch.zeros(n, n, dtype=h.dtype, device=h.device)
    padded[: h.shape[0], : h.shape[1]] = h
    return torch.stack([padded[g * width:(g + 1) * width, g * width:(g + 1) * width] for g in range(groups)])


def search_clip(weight: torch.Tensor, fmt: Format, stats, grid: tuple[float, ...] = GRID) -> torch.Tensor | float:
    """Clipping ratios, (out, n_groups) (one float for a per-tensor format)."""
    w = weight.float()
    out, cols = w.shape
    if fmt.group_size == 0:
        groups, width = 1, cols
    else:
        groups, width = fmt.n_groups(cols), fmt.group_width(cols)
    hb = _diagonal_blocks(stats.hessian.float(), groups, width)
    pad = groups * width - cols
    errors = []
    for ratio in grid:
        dw = w - fmt.fake_quantize(w, ratio)
        if pad:
            dw = torch.cat([dw, dw.new_zeros(out, pad)], dim=1)
        dw = dw.reshape(out, groups, width)
        errors.append(torch.einsum("ogi,gij,ogj->og", dw, hb, dw))
    errors = torch.stack(errors)  # (ratios, out, groups)
    ratios = torch.tensor(grid, dtype=torch.float32, device=w.device)
    if fmt.group_size == 0:
        return float(ratios[errors.sum(dim=(1, 2)).argmin()])
    return ratios[errors.argmin(dim=0)]
