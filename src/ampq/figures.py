"""Figures of a quantized model: where the bits went, how sensitive each layer is, and what each
size costs in quality. matplotlib, written as PNG without a display."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ampq.errors import AmpqError
from ampq.atomic import atomic_file

_BLOCK = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


def _grid(names: list[str]) -> tuple[list[int], list[str], dict[str, tuple[int, int]]]:
    """Layer names -> (block indices, projection columns in first-seen order, name -> (row, col))."""
    blocks, projections, where = [], [], {}
    for name in names:
        m = _BLOCK.match(name)
        if not m:
            continue
        block, proj = int(m.group(2)), m.group(3).split(".")[-1]
        if block not in blocks:
            blocks.append(block)
        if proj not in projections:
            projections.append(proj)
        where[name] = (blocks.index(block), projections.index(proj))
    return blocks, projections, where


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AmpqError("figures need matplotlib: pip install 'ampq[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def allocation_heatmap(layers: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Blocks x projections, colour = stored bits per weight, each cell labelled with its format.
    ``layers``: manifest or plan entries with ``format`` and ``bits_per_weight`` (or bytes and shape)."""

    plt = pyplot()
    blocks, projections, where = _grid(list(layers))
    bits = np.full((len(blocks), len(projections)), np.nan)
    labels = [[""] * len(projections) for _ in blocks]
    for name, (r, c) in where.items():
        e = layers[name]
        b = e.get("bits_per_weight")
        if b is None and e.get("bytes") and e.get("shape"):
            b = 8 * e["bytes"] / (e["shape"][0] * e["shape"][1])
        bits[r, c] = b if b is not None else np.nan
        residuals = (e.get("nested") or {}).get("residuals", [])  # adaptive layers: base + residual bits
        labels[r][c] = e["format"] + "".join(f"+{x['format'].split('-')[0]}" for x in residuals)
    fig, ax = plt.subplots(figsize=(1.3 * len(projections) + 2.5, 0.28 * len(blocks) + 1.6))
    im = ax.imshow(bits, aspect="auto", cmap="viridis", vmin=2, vmax=max(8.5, float(np.nanmax(bits))))
    for r in range(len(blocks)):
        for c in range(len(projections)):
            if labels[r][c]:
                ax.text(c, r, labels[r][c], ha="center", va="center", fontsize=5.5,
                        color="white" if bits[r, c] < 5.5 else "black")
    ax.set_xticks(range(len(projections)), projections, rotation=30)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    ax.set_ylabel("block")
    ax.set_title(title or "allocation: bits per weight")
    fig.colorbar(im, ax=ax, label="bits per weight")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def sensitivity_figure(table, path: str | Path, candidate: str | None = None) -> Path:
    """Left: estimated damage of each layer at one candidate (log scale, blocks x projections).
    Right: damage against bits per weight for every layer, one line each, coloured by projection."""

    plt = pyplot()
    names = list(table.damage)
    blocks, projections, where = _grid(names)
    weights = {n: table.shapes[n][0] * table.shapes[n][1] for n in names}

    def bits(n, c):
        return 8 * table.nbytes[n][c] / weights[n]

    candidates = [c for c in table.candidates if all(c in table.damage[n] for n in names)]
    if candidate is None:  # the candidate nearest 4 bits that every layer can take
        candidate = min(candidates, key=lambda c: abs(bits(names[0], c) - 4.25))
    grid = np.full((len(blocks), len(projections)), np.nan)
    for n, (r, c) in where.items():
        d = table.damage[n].get(candidate)
        grid[r, c] = math.log10(d) if d and d > 0 else np.nan
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.22 * len(blocks) + 3),
                                      gridspec_kw={"width_ratios": [1, 1.3]})
    im = left.imshow(grid, aspect="auto", cmap="magma")
    left.set_xticks(range(len(projections)), projections, rotation=30)
    left.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    left.set_ylabel("block")
    left.set_title(f"log10 estimated damage at {candidate} ({table.estimator})")
    fig.colorbar(im, ax=left)
    colours = plt.get_cmap("tab10")
    for n in names:
        proj = where[n][1] if n in where else 0
        pts = sorted((bits(n, c), d) for c, d in table.damage[n].items() if d > 0)
        if pts:
            right.plot(*zip(*pts), color=colours(proj % 10), lw=0.6, alpha=0.5)
    for i, p in enumerate(projections):
        right.plot([], [], color=colours(i % 10), label=p)
    right.set_yscale("log")
    right.set_xlabel("bits per weight")
    right.set_ylabel("estimated damage" + (" (nats of KL)" if table.estimator == "fisher" else ""))
    right.set_title("every layer: damage against size")
    right.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def pareto_figure(series: dict[str, list[tuple[float, float, float]]], path: str | Path, *,
                  original: float | None = None, title: str = "") -> Path:
    """Perplexity (left, up to 3x the original's) and KL to the original (right, log) against bits
    per weight. ``series``: label -> [(bits, perplexity, kl)]; a label starting with ``AMPQ`` is
    drawn as a curve, the others as points."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, col, name in ((axes[0], 1, "perplexity"), (axes[1], 2, "KL to the original (nats/token)")):
        for label, pts in series.items():
            pts = sorted(p for p in pts if p[col] is not None and p[col] > 0)
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[col] for p in pts]
            if label.startswith("AMPQ"):
                ax.plot(xs, ys, "o-", lw=2, label=label, zorder=3)
            else:
                ax.scatter(xs, ys, s=28, marker="s" if "ampq" in label else "^", label=label, alpha=0.8)
        ax.set_xlabel("bits per weight (quantized linears, everything stored)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    if original is not None:
        axes[0].axhline(original, color="grey", ls="--", lw=0.8, label="original")
        axes[0].set_ylim(original * 0.97, original * 3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title or "quality against size")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)
