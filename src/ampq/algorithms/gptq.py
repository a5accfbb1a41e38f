"""GPTQ (Frantar et al., 2022): quantize one input column at a time and spread each column's
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's output
error, H = 2 X^T X / n.

Dampening (a share of the mean diagonal added to it) keeps H invertible; lazy batch updates apply
the error of a block of columns to the rest at once. Group parameters are fitted when the group's
first column is reached, on the weights as the error feedback has left them. With ``act_order`` (the
default: lower Hessian-weighted error than in-order on real SmolLM2 layers, see
benchmarks/results/schemes.json for what it does to the whole model) the
columns are visited by descending Hessian diagonal and the group parameters are fitted up front
("static groups"), so codes stay in the original order and any kernel can run them. Formats whose
groups cannot be fitted one by one (double quantization, per channel, per tensor) are fitted up front.
"""

from __future__ import annotations

import torch

from ampq.algorithms.rtn import input_importance
from ampq.formats import Format, Params


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, dampening more if H is still not positive definite."""
    mean_diag = torch.diag(h).mean()
    # few (in, in) temporaries alive at once: for a wide layer each is as big as the layer's weight
    for attempt in range(6):
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the calibration Hessian is not positive definite even after dampening; use more calibration text")


def _prepared_hessian(stats, damp: float, act_order: bool, dtype: torch.dtype):
    """(dead columns, column order, upper Cholesky factor of H^-1 in that order), kept on ``stats``:
    the linears sharing an input, and every candidate format measured for them, reuse one factor."""
    cache = getattr(stats, "cache", None)
    key = ("gptq", damp, act_order, dtype)
    if cache is not None and key in cache:
        return cache[key]
    h = stats.hessian.to(dtype)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(h.shape[0])
    if act_order:
        h = h[perm]
        h = h[:, perm]
    prepared = dead, perm, _inverse_hessian_factor(h, damp)
    if cache is not None:
        cache[key] = prepared
    return prepared


def gptq(weight: torch.Tensor, fmt: Format, stats, clip: float | torch.Tensor = 1.0, *,
         damp: float = 0.01, block_size: int = 128, act_order: bool = True,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Params]:
    out_features, cols = weight.shape
    w = weight.to(dtype).clone()
    dead, perm, hinv = _prepared_hessian(stats, damp, act_order, dtype)
    w[:, dead] = 0

    clip = torch.as_tensor(clip, dtype=torch.float32)
    gs = fmt.group_size
    static = act_order or not gs or not fmt.groupwise_params
    if static:
        params = fmt.fit_importance(w.float(), clip, input_importance(stats))
        column_values = {k: v[:, perm].to(dtype) for k, v in fmt.expand(params.values, (out_features, cols)).items()}
    else:
        parts: list[Params] = []
        block_size = max(block_size // gs, 1) * gs  # a group never straddles two blocks
    w = w[:, perm]

    codes = torch.zeros(out_features, cols, dtype=torch.int32)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                vals = {k: v[:, col:col + 1] for k, v in column_values.items()}
            else:
                if col % gs == 0:
                    g = col // gs
                    group_clip = clip[:, g:g + 1] if clip.dim() == 2 else clip
                    parts.append(fmt.fit(w1[:, i:i + gs].float(), group_clip))
                    vals = {k: v.to(dtype) for k, v in parts[-1].values.items()}
            x = w1[:, i:i + 1]
            c = fmt.encode(x.float(), {k: v.float() for k, v in vals.items()})
            q = fmt.decode(c, {k: v.float() for k, v in vals.items()}).to(dtype)
            codes[:, col] = c[:, 0]
            e = (x - q) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    codes = codes[:, torch.argsort(perm)]
    return codes, (params if static else fmt.join_params(parts))
