"""Mixed-precision allocation: one candidate format per linear layer, minimal total damage within a
byte budget, solved exactly as a multiple-choice knapsack (MCKP).

HiGHS (scipy.optimize.milp) alone takes seconds, on some budgets over ten, to *prove* optimality on
realistic 500-linear instances: near the critical damage-per-byte price many candidates are almost
equally efficient, the LP bound stays loose and branch and bound has to enumerate. So a Lagrangian
reduction fixes every unit that provably cannot change, a Pareto dynamic programme over exact integer
bytes solves the remaining core (milliseconds), and HiGHS takes over only if that core blows up."""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ampq.errors import AmpqError


@dataclass
class Allocation:
    choice: dict[str, str]  # layer -> candidate name
    damage: float  # sum of chosen damages
    bytes: int  # sum of chosen bytes
    optimal: bool  # proven optimal by the solver


@dataclass
class _Unit:
    layers: list[str]
    cands: list[str]  # candidates every member has, in the first member's order


def _as_bytes(value, where: str) -> int:
    try:
        b = operator.index(value)  # exact integers only: a float byte count would hide rounding
    except TypeError:
        raise AmpqError(f"{where}: byte count must be an integer, got {value!r}") from None
    if isinstance(value, bool) or b < 0:
        raise AmpqError(f"{where}: byte count must be a non-negative integer, got {value!r}")
    return b


def _units(nbytes: dict[str, dict[str, int]], tie_groups) -> list[_Unit]:
    if not nbytes:
        raise AmpqError("nothing to allocate: no layers given")
    for layer, cands in nbytes.items():
        if not cands:
            raise AmpqError(f"layer {layer!r} has no candidate formats; give it at least one")
    owner: dict[str, int] = {}
    groups = [list(g) for g in (tie_groups or [])]
    for i, group in enumerate(groups):
        if not group:
            raise AmpqError(f"tie group {i} is empty; drop it or name its layers")
        for layer in group:
            if layer not in nbytes:
                raise AmpqError(f"tie group {group} names unknown layer {layer!r}")
            if layer in owner:
                raise AmpqError(f"layer {layer!r} appears in more than one tie group (or twice in one): "
                                f"{groups[owner[layer]]} and {group}; merge them into one group")
            owner[layer] = i
    units, seen = [], set()
    for layer in nbytes:  # input order, so results are deterministic
        if layer in seen:
            continue
        members = groups[owner[layer]] if layer in owner else [layer]
        seen.update(members)
        common = [c for c in nbytes[members[0]] if all(c in nbytes[m] for m in members[1:])]
        if not common:
            raise AmpqError(f"tie group {members} has no candidate format common to all its layers; "
                            "give them a shared candidate or split the group")
        units.append(_Unit(members, common))
    return units


def _unit_bytes(nbytes, unit: _Unit) -> list[int]:
    return [sum(_as_bytes(nbytes[m][c], f"nbytes[{m!r}][{c!r}]") for m in unit.layers) for c in unit.cands]


def _mb(b: int) -> str:
    return f"{b} bytes ({b / 1e6:.2f} MB)"


def reachable(nbytes: dict[str, dict[str, int]], tie_groups=None) -> tuple[int, int]:
    """Smallest and largest total bytes any allocation can have."""
    per_unit = [_unit_bytes(nbytes, u) for u in _units(nbytes, tie_groups)]
    return sum(map(min, per_unit)), sum(map(max, per_unit))


def allocate(damage: dict[str, dict[str, float]], nbytes: dict[str, dict[str, int]], budget_bytes: int,
             tie_groups: list[list[str]] | None = None, time_limit: float = 10.0) -> Allocation:
    """Choose one candidate per layer (the same within a tie group) minimising total damage with total
    bytes <= budget_bytes. ``optimal`` is False only if the time limit stopped the solver early."""
    if set(damage) != set(nbytes):
        raise AmpqError(f"damage and nbytes name different layers: only in damage "
                        f"{sorted(set(damage) - set(nbytes))}, only in nbytes {sorted(set(nbytes) - set(damage))}")
    for layer in nbytes:
        if set(damage[layer]) != set(nbytes[layer]):
            raise AmpqError(f"layer {layer!r}: damage and nbytes list different candidates "
                            f"({sorted(damage[layer])} vs {sorted(nbytes[layer])})")
        for c, d in damage[layer].items():
            if not isinstance(d, (int, float, np.floating, np.integer)) or not math.isfinite(d) or d < 0:
                raise AmpqError(f"damage[{layer!r}][{c!r}] = {d!r}: damage must be a finite number >= 0 "
                                "(leave a candidate out to forbid it)")
    try:
        budget = math.floor(budget_bytes)  # bytes are integers, so a fractional budget means its floor
    except (TypeError, ValueError, OverflowError):
        raise AmpqError(f"budget must be a finite number of bytes, got {budget_bytes!r}") from None

    units = _units(nbytes, tie_groups)
    ubytes = [_unit_bytes(nbytes, u) for u in units]
    udamage = [[math.fsum(float(damage[m][c]) for m in u.layers) for c in u.cands] for u in units]
    lo, hi = sum(map(min, ubytes)), sum(map(max, ubytes))
    if budget < lo:
        raise AmpqError(f"budget {_mb(budget)} is below the smallest reachable size {_mb(lo)} "
                        f"(largest reachable {_mb(hi)}); raise the budget or add smaller candidates")

    # Pareto frontier per unit: a candidate no smaller and no better than another is never needed.
    fronts = []
    for b, d in zip(ubytes, udamage):
        front, best = [], math.inf
        for j in sorted(range(len(b)), key=lambda j: (b[j], d[j], j)):
            if d[j] < best:
                front.append(j)
                best = d[j]
        fronts.append(front)

    def result(picks: list[int], optimal: bool) -> Allocation:
        choice = {}
        for u, j in zip(units, picks):
            choice.update({m: u.cands[j] for m in u.layers})
        return Allocation({layer: choice[layer] for layer in nbytes},
                          math.fsum(udamage[i][j] for i, j in enumerate(picks)),
                          sum(ubytes[i][j] for i, j in enumerate(picks)), optimal)

    best_quality = [f[-1] for f in fronts]
    if sum(ubytes[i][j] for i, j in enumerate(best_quality)) <= budget:
        return result(best_quality, True)
    keep, incumbent, lam = _reduce(fronts, ubytes, udamage, budget - lo)
    core = [i for i, k in enumerate(keep) if len(k) > 1]
    if not core:  # every candidate but the incumbent's is provably worse
        return result(incumbent, True)
    picks = [k[0] for k in keep]
    cap = budget - sum(ubytes[i][j] for i, j in enumerate(picks))
    opts = [(np.array([ubytes[i][j] for j in keep[i]], dtype=np.int64) - ubytes[i][keep[i][0]],
             np.array([udamage[i][j] for j in keep[i]])) for i in core]
    start = time.monotonic()
    levels = _pareto_dp(opts, cap, lam, math.fsum(udamage[i][incumbent[i]] for i in core), start + time_limit / 2)
    optimal = levels is not None
    if levels is None:
        levels, optimal = _milp(opts, cap, start + time_limit)
    if levels is None:
        return result(incumbent, False)
    for i, lv in zip(core, levels):
        picks[i] = keep[i][lv]
    assert sum(ubytes[i][j] for i, j in enumerate(picks)) <= budget
    return result(picks, optimal)


def _reduce(fronts, ubytes, udamage, room: int) -> tuple[list[list[int]], list[int], float]:
    """Exact Lagrangian reduction: per unit the candidates that can still be in an optimum, a feasible
    greedy incumbent and the LP optimum's price lam (room = budget - smallest reachable).

    For any lam >= 0, L = sum_u min_j (d_uj + lam*b_uj) - lam*room bounds the damage of every fitting
    allocation from below, and L + (d_uj + lam*b_uj - min_j ...) that of every one putting unit u at j;
    candidates whose bound exceeds the incumbent can never win. The LP price (greedy over convex-hull
    steps) makes the bounds tight, so only units near that price keep more than one candidate."""
    pts, steps = [], []
    for u, f in enumerate(fronts):
        b = np.array([ubytes[u][j] for j in f], dtype=np.int64)
        b -= b[0]  # offsets keep lam*b small next to the damages, so the float bounds stay accurate
        d = np.array([udamage[u][j] for j in f])
        pts.append((b, d))
        hull = [0]
        for j in range(1, len(f)):
            while len(hull) > 1 and ((d[hull[-1]] - d[hull[-2]]) * (b[j] - b[hull[-1]])
                                     >= (d[j] - d[hull[-1]]) * (b[hull[-1]] - b[hull[-2]])):
                hull.pop()
            hull.append(j)
        for t in range(1, len(hull)):
            db = int(b[hull[t]] - b[hull[t - 1]])
            steps.append(((d[hull[t - 1]] - d[hull[t]]) / db, u, t, hull[t], db))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    level, at, blocked = [0] * len(fronts), [0] * len(fronts), [False] * len(fronts)
    left, lam = room, 0.0
    for eff, u, t, j, db in steps:
        if blocked[u] or level[u] != t - 1:
            continue
        if db <= left:
            left -= db
            level[u], at[u] = t, j
        else:
            blocked[u] = True
            lam = lam or eff  # the first step that does not fit prices a byte in the LP optimum
    for u, (b, d) in enumerate(pts):  # spend what is left on the best candidate each unit can afford
        j = int(np.searchsorted(b, b[at[u]] + left, side="right")) - 1
        left -= int(b[j] - b[at[u]])
        at[u] = j
    inc = math.fsum(pts[u][1][at[u]] for u in range(len(fronts)))
    lagr = [d + lam * b for b, d in pts]
    low = math.fsum(float(x.min()) for x in lagr) - lam * room
    # Slack for float rounding in the bounds: keeping too much costs time, dropping the optimum is wrong.
    tol = 1e-9 * (abs(inc) + lam * room) + 1e-300
    keep = [[fronts[u][j] for j in np.flatnonzero(low + (x - x.min()) <= inc + tol)] for u, x in enumerate(lagr)]
    return keep, [fronts[u][at[u]] for u in range(len(fronts))], lam


_MAX_STATES = 200_000  # beyond this the DP hands over to HiGHS (memory stays near 100 MB)


def _pareto_dp(opts, cap: int, lam: float, inc: float, deadline: float) -> list[int] | None:
    """Exact DP over units: states are (bytes, damage) pairs, pruned when over cap, dominated (no fewer
    bytes and no less damage than another) or bounded out (damage + Lagrangian bound of the units still
    to come exceeds the incumbent). Returns each unit's option index, or None if the states blow up
    or time runs out."""
    mins = np.array([float((d + lam * b).min()) for b, d in opts])
    # Units with a large second-best reduced cost go first: their extra options are pruned at once.
    gaps = [np.partition(d + lam * b - m, 1)[1] for (b, d), m in zip(opts, mins)]
    order = np.argsort(gaps)[::-1]
    rest = np.r_[np.cumsum(mins[order][::-1])[::-1], 0.0]
    tol = 1e-9 * (abs(inc) + lam * cap) + 1e-300
    sb, sd = np.zeros(1, dtype=np.int64), np.zeros(1)
    trail = []
    for pos, u in enumerate(order):
        b, d = opts[u]
        nb, nd = (sb[:, None] + b).ravel(), (sd[:, None] + d).ravel()
        ok = np.flatnonzero((nb <= cap) & (nd + rest[pos + 1] - lam * (cap - nb) <= inc + tol))
        ok = ok[np.lexsort((nd[ok], nb[ok]))]
        front = nd[ok] < np.minimum.accumulate(np.r_[np.inf, nd[ok][:-1]])
        ok = ok[front]
        if len(ok) > _MAX_STATES or not len(ok) or time.monotonic() > deadline:
            return None
        trail.append(ok)
        sb, sd = nb[ok], nd[ok]
    levels = [0] * len(opts)
    s = int(np.argmin(sd))
    for pos in range(len(order) - 1, -1, -1):
        parent, levels[order[pos]] = divmod(int(trail[pos][s]), len(opts[order[pos]][0]))
        s = parent
    return levels


def _milp(opts, cap: int, deadline: float) -> tuple[list[int] | None, bool]:
    """The same core as a one-hot MILP for HiGHS; returns (option index per unit, proven optimal)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    var_unit = np.concatenate([np.full(len(b), k) for k, (b, _) in enumerate(opts)])
    bytes_ = np.concatenate([b for b, _ in opts])
    # Offsets and a common divisor keep coefficients small so HiGHS' tolerances see the differences.
    g = reduce(math.gcd, (int(x) for x in bytes_))
    dmg = np.concatenate([d - d.min() for _, d in opts])
    c = dmg / (dmg.max() or 1.0)
    n, nu = len(c), len(opts)
    one_each = LinearConstraint(csr_array((np.ones(n), (var_unit, np.arange(n))), shape=(nu, n)), 1, 1)
    starts = np.r_[0, np.cumsum([len(b) for b, _ in opts])]
    row, rhs, cuts = (bytes_ // g).astype(float)[None, :], cap // g, []
    proven = True
    for attempt in range(50):
        cons = [one_each, LinearConstraint(row, -np.inf, rhs)]
        if cuts:
            cons.append(LinearConstraint(np.array(cuts), -np.inf, nu - 1))
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=cons,
                   options=dict(time_limit=max(deadline - time.monotonic(), 0.01), mip_rel_gap=0.0))
        if res.x is None:
            return None, False
        # Each unit's largest x is its pick, whatever the integrality tolerance left in the others.
        levels = [int(np.argmax(res.x[starts[k]:starts[k + 1]])) for k in range(nu)]
        over = sum(int(opts[k][0][lv]) for k, lv in enumerate(levels)) - cap
        if over <= 0:  # checked in exact integers: HiGHS' float feasibility tolerance can admit a few bytes too many
            return levels, proven and res.status == 0
        if attempt < 40:  # exclude exactly this over-budget combination, which keeps the optimum intact
            cut = np.zeros(n)
            cut[[starts[k] + lv for k, lv in enumerate(levels)]] = 1
            cuts.append(cut)
        else:  # last resort: tighten the budget row itself, giving up the proof
            rhs -= -(-over // g)
            proven = False
    return None, False
