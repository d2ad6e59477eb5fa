"""Evaluation plots (matplotlib, Agg backend, PNG).

Every figure's title starts with the untrained warning when the weights were random, so a plot copied out of
its folder still says the numbers mean nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fewshotsam2.io.atomic import atomic_path

UNTRAINED_BANNER = "UNTRAINED: SAM2 ran with random weights (--untrained); these numbers mean nothing"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on servers; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _title(text: str, untrained: bool) -> str:
    return f"{UNTRAINED_BANNER}\n{text}" if untrained else text


def _save(fig, path: Path) -> None:
    # Atomic: a plot being rewritten is never seen half-written.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def plot_dice(summary_rows: Sequence[Mapping[str, object]], path: Path, untrained: bool = False) -> Path:
    """Grouped bars: mean Dice ± sd per structure (x) and method (bars); whole volume and labeled extent panels.

    `summary_rows`: the rows of summary.csv (keys structure, method, dice_mean, dice_sd, dice_extent_mean,
    dice_extent_sd); the "mean over structures" rows are plotted as their own group.
    """
    plt = _pyplot()
    structures = list(dict.fromkeys(str(r["structure"]) for r in summary_rows))
    methods = list(dict.fromkeys(str(r["method"]) for r in summary_rows))
    by_key = {(str(r["structure"]), str(r["method"])): r for r in summary_rows}
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.2 * len(structures) * max(1, len(methods)) * 0.8 * 2), 4.6),
                             sharey=True, squeeze=False)
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(structures))
    for ax, (key, label) in zip(axes[0], (("dice", "whole volume"), ("dice_extent", "labeled extent only"))):
        for m_i, method in enumerate(methods):
            means = [_f(by_key.get((s, method), {}).get(f"{key}_mean")) for s in structures]
            sds = [_f(by_key.get((s, method), {}).get(f"{key}_sd")) for s in structures]
            sds = [0.0 if math.isnan(v) else v for v in sds]
            xs = x + (m_i - (len(methods) - 1) / 2) * width
            have = np.isfinite(means)
            # a missing Dice is no bar and an "n/a" mark, never a zero-height bar that reads as Dice 0
            bars = ax.bar(xs[have], np.asarray(means)[have], width, yerr=np.asarray(sds)[have], capsize=3,
                          label=method)
            for xi in xs[~have]:
                ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90,
                        color=bars.patches[0].get_facecolor() if bars.patches else "0.4")
        ax.set_xticks(x)
        ax.set_xticklabels(structures, rotation=20, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Dice")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title("Dice per structure and method (per-case mean ± sd)", untrained), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def _structure_xy(points: Sequence[Mapping[str, object]], structure: str, xkey: str, ykey: str):
    """One structure's points: the rows, their x and y as float arrays, and which are finite in both."""
    pts = [p for p in points if str(p["structure"]) == structure]
    xs = np.array([_f(p[xkey]) for p in pts])
    ys = np.array([_f(p[ykey]) for p in pts])
    return pts, xs, ys, np.isfinite(xs) & np.isfinite(ys)


def plot_pi_vs_dice(points: Sequence[Mapping[str, object]], path: Path, untrained: bool = False) -> Path:
    """RevSAM2 Fig. 4 style: the reverse score π of each query slice against the true Dice of its forward
    prediction p_i. `points`: dicts with structure, score, forward_dice, in_extent (bool-like)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    structures = list(dict.fromkeys(str(p["structure"]) for p in points))
    for s in structures:
        pts, xs, ys, ok = _structure_xy(points, s, "score", "forward_dice")
        inside = np.array([str(p.get("in_extent", "")).lower() in ("1", "true") for p in pts], dtype=bool)
        varied = ok.sum() > 2 and np.std(xs[ok]) > 0 and np.std(ys[ok]) > 0
        r = np.corrcoef(xs[ok], ys[ok])[0, 1] if varied else math.nan
        sc = ax.scatter(xs[ok & inside], ys[ok & inside], s=12, alpha=0.7, label=f"{s} (r = {r:.2f})")
        ax.scatter(xs[ok & ~inside], ys[ok & ~inside], s=12, alpha=0.5, facecolors="none",
                   edgecolors=sc.get_facecolor()[0] if len(sc.get_facecolor()) else None)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("reverse score π (mean Dice of Ỹ_i vs Y on the supports)")
    ax.set_ylabel("true Dice of the forward prediction p_i")
    ax.set_title(_title("reverse: π vs true per-slice Dice\n(filled: inside the labeled extent; hollow: outside)",
                        untrained), fontsize=9)
    if structures:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_lpips_matching(points: Sequence[Mapping[str, object]], path: Path, untrained: bool = False) -> Path:
    """Matched support slice position against query slice position, both relative to the structure's labeled
    extent in their own volume (0 = first labeled slice, 1 = last). The diagonal is anatomical agreement.
    `points`: dicts with structure, query_pos_rel, support_pos_rel, in_extent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    structures = list(dict.fromkeys(str(p["structure"]) for p in points))
    flat = _flat_structures(points)  # 1-shot: every query slice can only match the one support slice
    for s in structures:
        _, xs, ys, ok = _structure_xy(points, s, "query_pos_rel", "support_pos_rel")
        ax.scatter(xs[ok], ys[ok], s=12, alpha=0.7, label=f"{s} (1 support slice: flat by design)" if s in flat else s)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.axvspan(0, 1, color="0.9", zorder=-1)
    ax.set_xlabel("query slice position\n(0 to 1 = the structure's labeled extent in the query; shaded)")
    ax.set_ylabel("matched support slice position\n(0 to 1 = the extent in the support)")
    ax.set_title(_title("lpips: matched support position vs query position", untrained), fontsize=9)
    if structures:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def _flat_structures(points: Sequence[Mapping[str, object]]) -> set[str]:
    """Structures for which every run (query, support) offered a single support slice to match (1-shot): their
    matched position is one value per run by construction, which says nothing about LPIPS matching."""
    runs: dict[tuple, set] = {}
    for p in points:
        y = _f(p["support_pos_rel"])
        if math.isfinite(y):
            runs.setdefault((str(p["structure"]), p.get("query"), p.get("support")), set()).add(y)
    structures = {key[0] for key in runs}
    return {s for s in structures if all(len(v) <= 1 for key, v in runs.items() if key[0] == s)}


def matching_is_flat(points: Sequence[Mapping[str, object]]) -> bool:
    """True when the matching plot would only show flat lines (see `_flat_structures`)."""
    return _flat_structures(points) == {str(p["structure"]) for p in points}


def empty_plot(path: Path, message: str, untrained: bool = False) -> Path:
    """A placeholder figure saying why there is nothing to plot (so the file list stays predictable)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=9, wrap=True)
    if untrained:
        ax.set_title(UNTRAINED_BANNER, fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return Path(path)

