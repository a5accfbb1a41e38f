"""GPTQ (Frantar et al., 2022): quantize one input column at a time and spread each column's
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's output
error, H = 2 X^T X / n.

Dampening (a share of the mean diagonal added to it) keeps H invertible and, at 10% (:data:`DAMP`),
keeps the error feedback from fitting the calibration Hessian's noise: 1%, the paper's value, left
layers with few calibration tokens per input (the last MLP down-projections) with a lower error on the
calibration text than round to nearest but a higher one on held-out text (benchmarks/gptq_damp.py,
docs/schemes.md). Lazy batch updates apply
the error of a block of columns to the rest at once. Group parameters are fitted when the group's
first column is reached, on the weights as the error feedback has left them. With ``act_order`` (the
default: lower Hessian-weighted error than in-order on real SmolLM2 layers, see
benchmarks/results/schemes.json for what it does to the whole model) the
columns are visited by descending Hessian diagonal and the group parameters are fitted up front
("static groups"), so codes stay in the original order and any kernel can run them. Formats whose
groups cannot be fitted one by one (double quantization, per channel, per tensor) are fitted up front.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ampq.algorithms.rtn import input_importance
from ampq.formats import Format, Params

# Decided across the built-in models by the held-out error of each layer (benchmarks/gptq_damp.py)
DAMP = 0.1


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
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(h.shape[0], device=h.device)
    if act_order:
        h = h[perm]
        h = h[:, perm]
    prepared = dead, perm, _inverse_hessian_factor(h, damp)
    if cache is not None:
        cache[key] = prepared
    return prepared


def gptq(weight: torch.Tensor, fmt: Format, stats, clip: float | torch.Tensor = 1.0, *,
         damp: float = DAMP, block_size: int = 128, act_order: bool = True,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, Params]:
    out_features, cols = weight.shape
    w = weight.to(dtype).clone()
    dead, perm, hinv = _prepared_hessian(stats, damp, act_order, dtype)
    w[:, dead] = 0

    clip = torch.as_tensor(clip, dtype=torch.float32, device=weight.device)
    gs = fmt.group_size
    static = act_order or not gs or not fmt.groupwise_params
    if static:
        params = fmt.fit_importance(w.float(), clip, input_importance(stats))
        column_values = {k: v[:, perm].to(dtype) for k, v in fmt.expand(params.values, (out_features, cols)).items()}
    else:
        parts: list[Params] = []
        block_size = max(block_size // gs, 1) * gs  # a group never straddles two blocks
    w = w[:, perm]

    codes = torch.zeros(out_features, cols, dtype=torch.int32, device=weight.device)
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


def _group_index(fmt: Format, cols: int, perm: torch.Tensor) -> torch.Tensor:
    """For each visited column, which of its row's parameter groups holds it."""
    if not fmt.group_size:
        return torch.zeros(cols, dtype=torch.long, device=perm.device)
    return perm // fmt.group_width(cols)


SWEEP_BYTES = 256 * 2**20  # the stacked rows of one sweep; more jobs run in several


class Solved(NamedTuple):
    dequantized: torch.Tensor  # float32, (out, in)
    codes: torch.Tensor | None  # int32, (out, in), where asked for
    params: Params


def gptq_many(jobs: list[tuple[torch.Tensor, Format, float | torch.Tensor]], stats, *, damp: float = DAMP,
              block_size: int = 128, act_order: bool = True, dtype: torch.dtype = torch.float32,
              codes: bool = False, max_bytes: int = SWEEP_BYTES) -> list[Solved | None]:
    """What :func:`gptq` gives for several (weight, format, clip) jobs whose layers share one
    input, from a single column sweep: each job's dequantized weight and parameters, and its codes
    with ``codes=True``.

    GPTQ's rows are independent given the Hessian, so the jobs' rows are stacked and the
    per-column work (round, error, feedback) runs once for all of them instead of once per job:
    what makes measuring every candidate format of every linear affordable. Integer formats round
    together in one expression (``IntegerFormat.affine_terms``); any other format rounds its own
    rows. Each job's result is that of :func:`gptq` on it alone, up to the summation order of the
    matrix products. A job whose format cannot take its weight (``fit`` raises ValueError) gets
    None. Static groups only (act-order, or formats fitted whole). Jobs whose stacked rows would
    take more than ``max_bytes`` run in several sweeps."""
    sizes = [j[0].numel() * 4 for j in jobs]
    if len(jobs) > 1 and sum(sizes) > max_bytes:
        cut, total = 1, sizes[0]
        while cut < len(jobs) and total + sizes[cut] <= max_bytes:
            total += sizes[cut]
            cut += 1
        kw = dict(damp=damp, block_size=block_size, act_order=act_order, dtype=dtype, codes=codes, max_bytes=max_bytes)
        return gptq_many(jobs[:cut], stats, **kw) + gptq_many(jobs[cut:], stats, **kw)
    for _, fmt, _ in jobs:
        if not (act_order or not fmt.group_size or not fmt.groupwise_params):
            raise ValueError("gptq_many needs static groups: act_order, or formats fitted whole")
    cols = jobs[0][0].shape[1]
    dead, perm, hinv = _prepared_hessian(stats, damp, act_order, dtype)
    # integer jobs first, so their rows are one slice [0, n_affine) rounded in one expression
    order = sorted(range(len(jobs)), key=lambda j: not hasattr(jobs[j][1], "affine_terms"))
    importance = input_importance(stats)
    rows, fitted, spans, params, start = [], [], {}, {}, 0
    for j in order:
        weight, fmt, clip = jobs[j]
        w = weight.to(dtype).clone()
        w[:, dead] = 0
        try:
            p = fmt.fit_importance(w.float(), torch.as_tensor(clip, dtype=torch.float32, device=w.device), importance)
        except ValueError:
            continue
        params[j] = p
        n = w.shape[0]
        # parameter values transposed, (groups, rows): a block's columns gather into contiguous rows
        values_t = {k: (v if v.shape[0] == n else v.expand(n, -1)).t().to(dtype) for k, v in p.values.items()}
        fitted.append((slice(start, start + n), fmt, values_t, _group_index(fmt, cols, perm)))
        spans[j] = fitted[-1][0]
        rows.append(w.t()[perm])
        start += n
    if not rows:
        return [None] * len(jobs)
    # transposed, (columns, rows): a column is one contiguous row and its feedback one rank-1 update
    w = torch.cat(rows, dim=1)
    del rows
    affine = [f for f in fitted if hasattr(f[1], "affine_terms")]
    others = [f for f in fitted if not hasattr(f[1], "affine_terms")]
    n_affine = affine[-1][0].stop if affine else 0
    codes_t = torch.empty(w.shape, dtype=torch.int32, device=w.device) if codes else None

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        terms = None
        if affine:
            parts = []
            for span, fmt, values_t, gidx in affine:
                off, inv, scale, lo, hi = fmt.affine_terms({k: v[gidx[i1:i2]] for k, v in values_t.items()})
                parts.append((off, inv, scale, torch.full_like(scale, float(lo)), torch.full_like(scale, float(hi))))
            terms = [torch.cat(t, dim=1) for t in zip(*parts)]
        other_values = [{k: v[gidx[i1:i2]].float() for k, v in values_t.items()} for _, _, values_t, gidx in others]
        w1 = w[i1:i2]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            x = w1[i]
            q = torch.empty_like(x)
            if terms is not None:
                off, inv, scale, lo, hi = (t[i] for t in terms)
                r = torch.minimum(torch.maximum(torch.round((x[:n_affine] - off) * inv), lo), hi)
                q[:n_affine] = r * scale + off
                if codes_t is not None:
                    codes_t[i1 + i, :n_affine] = r - lo  # the code: the rounded step counted from the lowest
            for (span, fmt, _, _), vals in zip(others, other_values):
                col = {k: v[i, :, None] for k, v in vals.items()}
                c = fmt.encode(x[span, None].float(), col)
                q[span] = fmt.decode(c, col)[:, 0].to(dtype)
                if codes_t is not None:
                    codes_t[i1 + i, span] = c[:, 0]
            e = torch.div(x - q, hinv1[i, i], out=err1[i])
            w1[i + 1:].addr_(hinv1[i, i + 1:], e, alpha=-1)
            w1[i] = q
        w[i2:] -= hinv[i1:i2, i2:].t() @ err1

    back = torch.argsort(perm)
    w = w[back].t()
    if codes_t is not None:
        codes_t = codes_t[back].t()
    return [Solved(w[spans[j]].float().contiguous(), codes_t[spans[j]].contiguous() if codes else None, params[j])
            if j in spans else None for j in range(len(jobs))]
