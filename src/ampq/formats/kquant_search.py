"""The weighted parameter searches of llama.cpp's K-quants (ggml-quants.c), vectorized over blocks.

Each minimizes sum_i w_i (x_i - decoded_i)^2 for one sub-block (or, one level up, for the vector of
a block's sub-block scales, weighted by the sub-blocks' total weight), by trying a fan of inverse
scales around the plain one and solving the weighted least-squares scale (and minimum) for the codes
each gives, as ``make_qkx3_quants``, ``make_qx_quants`` and ``make_qp_quants`` do; the sums run in
float64 here. Rows of every argument are independent problems.
"""

from __future__ import annotations

import torch

EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zero


def _safe(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, d, torch.ones_like(d))


def scale_and_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float = -0.9, rdelta: float = 0.05,
                  nstep: int = 36) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale >= 0, m >= 0) per row with x ~ scale * q - m, q in [0, nmax] (``make_qkx3_quants``).

    Each trial of the fan measures its codes from the best minimum found so far, over the range
    from it to the maximum, not from the first one: a better minimum narrows the range the next
    trials divide, which is what lets the search reach grids the first range never offers (with
    few levels this matters most: Q2_K, Q4_K)."""
    lo = x.amin(1).clamp(max=0)
    hi = x.amax(1)
    flat = hi <= lo
    sum_w = w.sum(1)
    sum_x = (w * x).sum(1)
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    best_scale, best_min = span / nmax, lo
    q = torch.round((x - lo[:, None]) * (nmax / span)[:, None]).clamp_(0, nmax)
    best_err = (w * (best_scale[:, None] * q + lo[:, None] - x) ** 2).sum(1)
    for step in range(nstep + 1):
        # the best minimum can sit at or near the maximum: v may be inf or nan, and counts as 0 unless above it
        v = (x - best_min[:, None]) * ((rmin + rdelta * step + nmax) / (hi - best_min))[:, None]
        q = torch.where(v > 0, torch.round(v.clamp(max=nmax)), torch.zeros_like(v))
        wq = w * q
        sum_l, sum_l2, sum_xl = wq.sum(1), (wq * q).sum(1), (wq * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(det)
        minimum = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(det)
        positive = minimum > 0  # the minimum may not rise above 0: refit the scale alone
        scale = torch.where(positive, sum_xl / _safe(sum_l2), scale)
        minimum = torch.where(positive, torch.zeros_like(minimum), minimum)
        err = (w * (scale[:, None] * q + minimum[:, None] - x) ** 2).sum(1)
        better = (det > 0) & (err < best_err) & ~flat
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, minimum, best_min)
    zero = torch.zeros_like(best_scale)
    return torch.where(flat, zero, best_scale), torch.where(flat, -lo, -best_min)


def signed_scale(x: torch.Tensor, w: torch.Tensor, nmax: int, nstep: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, q) per row with x ~ scale * q, q in [-nmax, nmax - 1] (``make_qx_quants``, rmse_type 1):
    the value of largest magnitude goes to -nmax, so the scale's sign follows it."""
    idx = x.abs().argmax(1, keepdim=True)
    peak = x.gather(1, idx)[:, 0]
    zero = peak.abs() < EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    best_scale = best = best_q = None
    for step in [0] + [s for s in range(-nstep, nstep + 1) if s]:
        q = torch.round(x * (-(nmax + 0.1 * step) / peak)[:, None]).clamp_(-nmax, nmax - 1)
        wq = w * q
        sumlx, suml2 = (wq * x).sum(1), (wq * q).sum(1)
        scale = torch.where(suml2 > 0, sumlx / _safe(suml2), torch.zeros_like(suml2))
        if best is None:
            best_scale, best, best_q = scale, scale * sumlx, q
            continue
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_scale = torch.where(better, scale, best_scale)
        best = torch.where(better, scale * sumlx, best)
        best_q = torch.where(better[:, None], q, best_q)
    return torch.where(zero, torch.zeros_like(best_scale), best_scale), torch.where(zero[:, None], 0, best_q)


def positive_levels(v: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, L) per row with v ~ d * L, L in [0, nmax] integers, v >= 0 (``make_qp_quants``: a fan of
    scales, then up to five passes moving one level at a time while the weighted fit improves)."""
    peak = v.amax(1)
    zero = peak < EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)

    def mse(iscale):
        q = torch.round(v * iscale[:, None]).clamp_(max=nmax)
        return (w * (v - q / iscale[:, None]) ** 2).sum(1)

    iscale = nmax / peak
    best = mse(iscale)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (0.1 * step + nmax) / peak
        err = mse(trial)
        better = err < best
        best, iscale = torch.where(better, err, best), torch.where(better, trial, iscale)
    q = torch.round(v * iscale[:, None]).clamp_(max=nmax)
    sumlx, suml2 = (w * v * q).sum(1), (w * q * q).sum(1)
    for _ in range(5):
        changed = False
        for i in range(v.shape[1]):
            wi, vi, qi = w[:, i], v[:, i], q[:, i]
            slx, sl2 = sumlx - wi * vi * qi, suml2 - wi * qi * qi
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(vi * sl2 / _safe(slx)).clamp_(max=nmax)
            slx2, sl22 = slx + wi * vi * new, sl2 + wi * new * new
            take = ok & (new != qi) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if bool(take.any()):
                changed = True
                q[:, i] = torch.where(take, new, qi)
                sumlx, suml2 = torch.where(take, slx2, sumlx), torch.where(take, sl22, suml2)
        if not changed:
            break
    d = torch.where(suml2 > 0, sumlx / _safe(suml2), torch.zeros_like(suml2))
    return torch.where(zero, torch.zeros_like(d), d), torch.where(zero[:, None], 0, q)
